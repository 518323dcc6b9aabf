"""Creating Lodestar's topics on the broker (idempotent), and reading a consumer group's lag."""

from __future__ import annotations

import contextlib

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from lodestar.kafka_io import make_admin
from lodestar.names import Topics
from lodestar.settings import Settings


def fixed_topic_partitions(settings: Settings) -> dict[str, int]:
    """The fixed topics and the partitions each should have."""
    k = settings.kafka
    t = Topics(k.topic_prefix)
    return {
        t.requests: k.request_partitions,
        t.results: k.results_partitions,
        t.telemetry: k.telemetry_partitions,
        t.dlq: 1,
    }


async def ensure_topics(settings: Settings, topics: dict[str, int]) -> dict[str, str]:
    """Create each topic with its partitions unless it exists; returns topic -> 'created'|'exists'."""
    admin = make_admin(settings)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        outcome = {name: "exists" for name in topics if name in existing}
        new = [
            NewTopic(name, num_partitions=parts, replication_factor=settings.kafka.replication_factor)
            for name, parts in topics.items()
            if name not in existing
        ]
        if new:
            # A concurrent creator may win the race; the topic then exists, which is all we need.
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(new)
            for nt in new:
                outcome[nt.name] = "created"
        return outcome
    finally:
        await admin.close()


async def group_lag(admin: AIOKafkaAdminClient, offsets: AIOKafkaConsumer, group_id: str, topic: str) -> int:
    """Records of `topic` the group has not committed yet (all of them if it committed nothing); `offsets` is
    any started consumer (it reads the end offsets)."""
    (described,) = await admin.describe_topics([topic])
    partitions = [TopicPartition(topic, p["partition"]) for p in described["partitions"]]
    ends = await offsets.end_offsets(partitions)
    committed = await admin.list_consumer_group_offsets(group_id, partitions=partitions)
    return sum(end - (committed[tp].offset if tp in committed and committed[tp].offset >= 0 else 0)
               for tp, end in ends.items())
