"""Helpers for the worker and client integration tests: isolated settings (unique topic and key prefixes
per test, removed afterwards), topic readers and an in-process worker. The emulator subprocess they run
against comes from tests/emulator_process.py.

The broker and Redis come from the conftest's `kafka_bootstrap` and `redis_url` fixtures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from aiokafka import TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from redis.exceptions import RedisError

from app.namespace import remove_namespace
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.kafka_io import make_consumer, make_producer
from lodestar.names import RedisKeys, Topics
from lodestar.redis_io import make_redis
from lodestar.schemas import InferenceRequest, RoutedRequest, RoutingDecision, SamplingParams
from lodestar.settings import Settings
from lodestar.settings import settings_env as lodestar_settings_env
from lodestar.snapshot_keys import signing_key, verification_keys
from lodestar.snapshot_store import SnapshotStore
from lodestar.worker_registry import WorkerRegistry


def require_services(settings: Settings) -> None:
    """Fail the test unless the broker and Redis answer (start them with `scripts/services start`)."""
    host, _, port = settings.kafka.bootstrap_servers.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        pytest.fail(f"Kafka is not reachable at {settings.kafka.bootstrap_servers}; run `scripts/services start`")

    async def ping() -> None:
        client = make_redis(settings)
        try:
            await client.ping()
        finally:
            await client.aclose()

    try:
        asyncio.run(ping())
    except (OSError, RedisError):
        pytest.fail(f"Redis is not reachable at {settings.redis.url}; run `scripts/services start`")


def isolated_settings(
    kafka_bootstrap: str | None = None, redis_url: str | None = None, worker_id: str = "w1", sglang_url: str = "",
    **worker: Any,
) -> Settings:
    """Settings whose topics, Redis keys and snapshot signing key no other test shares (remove the topics and
    keys with `cleanup`).

    The broker and Redis, and how to log in to them, default to the configured ones (LODESTAR_KAFKA__*,
    LODESTAR_REDIS__*).
    """
    tag = uuid.uuid4().hex[:10]
    configured = Settings()
    return Settings(
        kafka={"bootstrap_servers": kafka_bootstrap or configured.kafka.bootstrap_servers,
               "topic_prefix": f"it{tag}.", "request_partitions": 2, "results_partitions": 2,
               "telemetry_partitions": 1},
        redis={"url": redis_url or configured.redis.url, "key_prefix": f"it{tag}:"},
        worker={"worker_id": worker_id, "sglang_url": sglang_url, "gpu_type": "H100",
                "retry_backoff_s": 0.05, **worker},
        snapshot_signing={"key_id": f"it{tag}", "key": secrets.token_hex(32)},
    )


def settings_env(settings: Settings) -> dict[str, str]:
    """Environment that makes a `lodestar` subprocess use these settings' broker, Redis (with their security),
    prefixes and snapshot keys."""
    return {**os.environ, **lodestar_settings_env(settings, "kafka", "redis", "snapshot_signing", "dev_mode")}


def routed(
    worker_id: str = "w1", request_id: str | None = None, prompt: str = "tell me about the stars",
    max_new_tokens: int = 8, **request: Any,
) -> RoutedRequest:
    """A request as a dispatcher would route it to `worker_id`."""
    req = InferenceRequest(
        prompt=prompt, sampling=SamplingParams(max_new_tokens=max_new_tokens),
        **({"request_id": request_id} if request_id else {}), **request,
    )
    return RoutedRequest(request=req, decision=RoutingDecision(worker_id=worker_id, policy="test"))


async def create_topics(settings: Settings) -> None:
    """The fixed topics (with the test's small partition counts) and the worker's topic."""
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, {**fixed_topic_partitions(settings),
                                   topics.worker(settings.worker.worker_id): 1})


async def cleanup(settings: Settings) -> None:
    """Delete the topics and Redis keys under the settings' prefixes."""
    await remove_namespace(settings)


async def produce(settings: Settings, topic: str, values: list[bytes], key: bytes | None = None) -> None:
    """Send raw values to a topic and wait for the acks."""
    producer = make_producer(settings, client_id="test-produce")
    await producer.start()
    try:
        acks = [await producer.send(topic, value, key=key) for value in values]  # in order, batched
        await asyncio.gather(*acks)
    finally:
        await producer.stop()


class TopicReader:
    """Reads topics from their beginning without a consumer group and keeps every decoded message."""

    def __init__(self, settings: Settings, *topics: str):
        self._consumer = make_consumer(settings, *topics, group_id=None, client_id="test-topic-reader",
                                       metadata_max_age_ms=1000)
        self.messages: dict[str, list[dict[str, Any]]] = {t: [] for t in topics}

    async def __aenter__(self) -> TopicReader:
        await self._consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._consumer.stop()

    async def poll(self, seconds: float) -> None:
        """Read whatever arrives within `seconds`."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            batches = await self._consumer.getmany(timeout_ms=int(min(left, 0.2) * 1000))
            for tp, records in batches.items():
                self.messages[tp.topic].extend(json.loads(r.value) for r in records)

    async def wait_for(self, predicate: Callable[[dict[str, list[dict[str, Any]]]], bool], timeout: float) -> None:
        """Read until `predicate(messages)` holds; fails the test after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not predicate(self.messages):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out; read so far: { {t: len(m) for t, m in self.messages.items()} }")
            await self.poll(0.2)


async def committed_offset(settings: Settings, group: str, topic: str) -> int | None:
    """The offset a consumer group has committed on partition 0 of a topic."""
    consumer = make_consumer(settings, group_id=group, client_id="test-committed-offset")
    await consumer.start()
    try:
        return await consumer.committed(TopicPartition(topic, 0))
    finally:
        await consumer.stop()


async def wait_committed(settings: Settings, group: str, topic: str, offset: int, timeout: float = 10.0) -> None:
    """Wait until the group's committed offset reaches `offset`."""
    deadline = time.monotonic() + timeout
    while (got := await committed_offset(settings, group, topic)) != offset:
        if time.monotonic() > deadline:
            pytest.fail(f"committed offset is {got}, expected {offset}")
        await asyncio.sleep(0.2)


def registry(settings: Settings) -> tuple[aioredis.Redis, RedisKeys, WorkerRegistry]:
    """A Redis client on the test's key prefix and the worker registry over it."""
    client = make_redis(settings, decode_responses=True)
    keys = RedisKeys(settings.redis.key_prefix)
    return client, keys, WorkerRegistry(client, keys, settings.worker.state_ttl_s)


def snapshot_store(settings: Settings, client: aioredis.Redis) -> SnapshotStore:
    """The snapshot store as the learner (signing) and a dispatcher (verifying) of these settings see it."""
    return SnapshotStore(client, RedisKeys(settings.redis.key_prefix), signing_key=signing_key(settings),
                         verification_keys=verification_keys(settings))


async def wait_registered(settings: Settings, timeout: float = 30.0) -> None:
    """Wait until the settings' worker appears among the live workers."""
    client, _, reg = registry(settings)
    try:
        deadline = time.monotonic() + timeout
        while settings.worker.worker_id not in {w.worker_id for w in await reg.live_workers()}:
            if time.monotonic() > deadline:
                pytest.fail(f"worker {settings.worker.worker_id} did not register")
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, engine: Any = None) -> AsyncIterator[Any]:
    """A WorkerService (optionally on a given SGLangClient) running in this event loop; drained on exit."""
    from workers.service import WorkerService

    service = WorkerService(settings, engine=engine)
    task = asyncio.create_task(service.run())
    try:
        await wait_registered(settings)
        yield service
    finally:
        service.request_drain()
        await asyncio.wait_for(task, 30)


def engine_requests_total(url: str) -> float:
    """How many generations the engine has run (SGLang's sglang:num_requests_total counter)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("sglang:num_requests_total", "sglang:num_requests"):
                return sample.value
    raise AssertionError("the engine's /metrics has no sglang:num_requests_total")
