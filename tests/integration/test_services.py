"""The local services answer the way the rest of Lodestar relies on: a Kafka broker that keeps
messages once per consumer group and splits partitions among a group's members, and a Redis that
stores strings and expiring hashes and delivers pub/sub messages."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import NewTopic

from lodestar.kafka_io import make_admin, make_consumer, make_producer
from lodestar.settings import Settings

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 3
N_MESSAGES = 300


async def create_topic(settings: Settings, name: str, partitions: int) -> None:
    admin = make_admin(settings, client_id="test-services")
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def wait_for_split(consumers: list[AIOKafkaConsumer], partitions: int, timeout: float = 30.0) -> None:
    """Until every member holds at least one partition and together they hold each exactly once."""
    deadline = time.monotonic() + timeout
    while True:
        owned = [c.assignment() for c in consumers]
        union = set().union(*owned)
        if all(owned) and sum(map(len, owned)) == len(union) == partitions:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"the consumer group did not settle within {timeout}s: {owned}")
        await asyncio.sleep(0.05)


async def test_a_group_of_two_splits_the_partitions_and_receives_each_message_once(
    kafka_bootstrap: str, service_settings: Settings, kafka_topic: str
) -> None:
    await create_topic(service_settings, kafka_topic, PARTITIONS)
    consumers = [
        make_consumer(service_settings, kafka_topic, group_id=f"{kafka_topic}-group", client_id=f"member-{i}",
                      metadata_max_age_ms=1000, heartbeat_interval_ms=500)
        for i in range(2)
    ]
    for c in consumers:
        await c.start()
    try:
        await wait_for_split(consumers, PARTITIONS)
        assignment_before = [set(c.assignment()) for c in consumers]

        producer = make_producer(service_settings, client_id="test-services")
        await producer.start()
        try:
            sent = [
                await producer.send(kafka_topic, f"m-{i}".encode(), key=f"k-{i}".encode(), partition=i % PARTITIONS)
                for i in range(N_MESSAGES)
            ]
            records = await asyncio.gather(*sent)
        finally:
            await producer.stop()
        # the idempotent producer wrote every message once: offsets 0..n-1 in each partition
        offsets: dict[int, list[int]] = {}
        for r in records:
            offsets.setdefault(r.partition, []).append(r.offset)
        for p in range(PARTITIONS):
            assert sorted(offsets[p]) == list(range(N_MESSAGES // PARTITIONS)), f"partition {p}: {offsets[p]}"

        received: list[list[tuple[int, int, str]]] = [[], []]
        stop = asyncio.Event()

        async def drain(member: int, consumer: AIOKafkaConsumer) -> None:
            while not stop.is_set():
                batches = await consumer.getmany(timeout_ms=200)
                for tp, msgs in batches.items():
                    received[member].extend((tp.partition, m.offset, m.value.decode()) for m in msgs)
                if batches:
                    await consumer.commit()

        tasks = [asyncio.create_task(drain(i, c)) for i, c in enumerate(consumers)]
        try:
            deadline = time.monotonic() + 60
            while sum(map(len, received)) < N_MESSAGES and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(1.0)  # room for duplicates to show up, if there were any
        finally:
            stop.set()
            await asyncio.gather(*tasks)

        counts = Counter(value for member in received for _, _, value in member)
        expected = {f"m-{i}" for i in range(N_MESSAGES)}
        assert set(counts) == expected, f"missing {sorted(expected - set(counts))[:10]}, extra {set(counts) - expected}"
        assert [v for v, n in counts.items() if n > 1] == [], "some messages were delivered more than once"

        seen = [{p for p, _, _ in member} for member in received]
        assert all(seen), f"a member received nothing: partitions per member {seen}"
        assert not seen[0] & seen[1], f"both members read partitions {seen[0] & seen[1]}"
        assert seen[0] | seen[1] == set(range(PARTITIONS))
        assert [set(c.assignment()) for c in consumers] == assignment_before, "the group rebalanced mid-test"
        # what was read was committed for the group
        committed = {
            tp.partition: await consumers[0].committed(tp)
            for tp in (TopicPartition(kafka_topic, p) for p in range(PARTITIONS))
        }
        assert committed == dict.fromkeys(range(PARTITIONS), N_MESSAGES // PARTITIONS)
    finally:
        for c in consumers:
            await c.stop()


async def test_redis_strings_expiring_hashes_and_pubsub(redis_client: aioredis.Redis, redis_prefix: str) -> None:
    key = f"{redis_prefix}greeting"
    assert await redis_client.set(key, "hello")
    assert await redis_client.get(key) == "hello"

    worker = f"{redis_prefix}worker:w1"
    assert await redis_client.hset(worker, mapping={"gpu": "H100", "queue_len": "3"}) == 2
    assert await redis_client.expire(worker, 30)
    assert await redis_client.hgetall(worker) == {"gpu": "H100", "queue_len": "3"}
    assert 0 < await redis_client.ttl(worker) <= 30
    assert await redis_client.hincrby(worker, "queue_len", 2) == 5

    channel = f"{redis_prefix}events"
    pubsub = redis_client.pubsub()
    try:
        await pubsub.subscribe(channel)
        confirm = await pubsub.get_message(timeout=5.0)
        assert confirm is not None and confirm["type"] == "subscribe"
        assert await redis_client.publish(channel, "worker w1 is up") == 1
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert message is not None, "the published message never arrived"
        assert (message["channel"], message["data"]) == (channel, "worker w1 is up")
    finally:
        await pubsub.unsubscribe(channel)
        await pubsub.aclose()


def test_services_script_reports_both_up_and_start_is_idempotent(kafka_bootstrap: str, redis_url: str) -> None:
    env = {**os.environ, "LODESTAR_KAFKA__BOOTSTRAP_SERVERS": kafka_bootstrap, "LODESTAR_REDIS__URL": redis_url}
    status = subprocess.run(
        [ROOT / "scripts" / "services", "status"], env=env, capture_output=True, text=True, timeout=60
    )
    assert status.returncode == 0, status.stdout + status.stderr
    assert "kafka: up at" in status.stdout and "redis: up at" in status.stdout

    start = subprocess.run(
        [ROOT / "scripts" / "services", "start"], env=env, capture_output=True, text=True, timeout=120
    )
    assert start.returncode == 0, start.stdout + start.stderr
    assert "(nothing to start)" in start.stdout, start.stdout
