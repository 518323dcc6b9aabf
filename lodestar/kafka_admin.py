"""Creating Lodestar's topics on the broker (idempotent)."""

from __future__ import annotations

import contextlib

from aiokafka.admin import NewTopic
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
