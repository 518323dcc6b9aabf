"""Helpers for the dispatcher and learner integration tests: isolated settings with their own consumer
groups, fake-heartbeated workers, a dispatcher running in-process, offsets and request producers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aiokafka import TopicPartition
from worker_harness import isolated_settings, produce

from dispatcher.service import Dispatcher
from learner.service import LearnerService
from lodestar.kafka_admin import ensure_topics
from lodestar.kafka_io import make_consumer
from lodestar.names import RedisKeys, Topics
from lodestar.redis_io import make_redis
from lodestar.schemas import InferenceRequest, WorkerState
from lodestar.settings import Settings
from lodestar.worker_registry import WorkerRegistry


def dispatch_settings(**dispatcher: Any) -> Settings:
    """Isolated settings (own topics, keys and consumer groups) with a fast dispatcher."""
    s = isolated_settings()
    s.dispatcher = s.dispatcher.model_copy(update={
        "consumer_group": f"{s.kafka.topic_prefix}dispatchers", "policy": "least_request",
        "no_worker_backoff_s": 0.05, **dispatcher,
    })
    s.worker = s.worker.model_copy(update={"state_ttl_s": 2.0})
    s.learner = s.learner.model_copy(update={"consumer_group": f"{s.kafka.topic_prefix}learner"})
    return s


class FakeWorkers:
    """Worker registry entries kept alive by a heartbeat task, as the worker service would."""

    def __init__(self, settings: Settings):
        self.client = make_redis(settings)
        self.registry = WorkerRegistry(self.client, RedisKeys(settings.redis.key_prefix), settings.worker.state_ttl_s)
        self.topics = Topics(settings.kafka.topic_prefix)
        self.settings = settings
        self.states: dict[str, WorkerState] = {}
        self._task: asyncio.Task[None] | None = None

    async def add(self, worker_id: str, gpu_type: str = "H100", **state: Any) -> None:
        await ensure_topics(self.settings, {self.topics.worker(worker_id): 1})
        self.states[worker_id] = WorkerState(worker_id=worker_id, gpu_type=gpu_type,
                                             topic=self.topics.worker(worker_id), **state)
        await self.registry.publish(self.states[worker_id])

    async def kill(self, worker_id: str) -> None:
        """Stop heartbeating and drop the entry at once (as if its TTL expired)."""
        self.states.pop(worker_id)
        await self.registry.deregister(worker_id)

    async def _beat(self) -> None:
        while True:
            for state in list(self.states.values()):
                await self.registry.publish(state.model_copy(update={"updated_at": time.time() * 1000}))
            await asyncio.sleep(0.3)

    async def __aenter__(self) -> FakeWorkers:
        self._task = asyncio.create_task(self._beat())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.client.aclose()


@contextlib.asynccontextmanager
async def running_dispatcher(settings: Settings, dispatcher_id: str = "d1", **kw: Any
                             ) -> AsyncIterator[Dispatcher]:
    stop = asyncio.Event()
    service = Dispatcher(settings, dispatcher_id=dispatcher_id, **kw)
    task = asyncio.create_task(service.run(stop))
    try:
        await wait_until(lambda: bool(service.assigned_partitions()) or task.done(), 20, "partition assignment")
        if task.done():
            task.result()
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def committed_total(settings: Settings, group: str, topic: str) -> int:
    consumer = make_consumer(settings, group_id=group, client_id="test-committed-total")
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        if not parts:
            await consumer._client.force_metadata_update()  # noqa: SLF001 - a fresh consumer knows no topic yet
            parts = consumer.partitions_for_topic(topic) or set()
        total = 0
        for p in sorted(parts):
            total += await consumer.committed(TopicPartition(topic, p)) or 0
        return total
    finally:
        await consumer.stop()


def shared_prefix_requests(n: int, reply_to: str | None = None) -> list[InferenceRequest]:
    system = list(range(1000, 1064))  # 4 blocks of 16 tokens shared by everyone
    return [InferenceRequest(input_ids=system + [i] * 20, reply_to=reply_to) for i in range(n)]


async def produce_requests(settings: Settings, requests: list[InferenceRequest]) -> None:
    topic = Topics(settings.kafka.topic_prefix).requests
    for r in requests:
        await produce(settings, topic, [r.to_bytes()], key=r.request_id.encode())


@contextlib.asynccontextmanager
async def running_learner(settings: Settings) -> AsyncIterator[LearnerService]:
    """A learner service running as a task until the block exits."""
    stop = asyncio.Event()
    service = LearnerService(settings)
    task = asyncio.create_task(service.run(stop))
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
