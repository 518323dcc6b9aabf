"""Liveness and readiness (lodestar/health.py) and the probes served beside /metrics: conditions, the
event-loop liveness check, the group-join listener, and the readiness hooks of the three services."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry
from test_learned_policy import feature_snapshot

from dispatcher.service import Dispatcher
from learner.service import LearnerService
from lodestar.health import Condition, GroupJoined, Health
from lodestar.metrics import LearnerMetrics, start_metrics_server
from lodestar.settings import Settings
from lodestar.snapshot import Snapshot
from workers.service import WorkerService


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running in a thread of its own (as a service's loop is, seen from the HTTP thread)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


def test_ready_only_when_every_declared_condition_holds() -> None:
    health = Health("group", "model")
    assert not health.ready
    assert health.conditions()["group"].detail == "not yet"
    health.set("group", True, "member")
    assert not health.ready
    health.set("model", True, "fallback declared")
    assert health.ready
    health.set("group", False, "draining")
    assert not health.ready
    with pytest.raises(KeyError, match="undeclared"):
        health.set("engine", True, "typo")
    with pytest.raises(ValueError):
        Health()


def test_alive_while_the_loop_runs_callbacks_not_when_blocked_or_closed(
    loop_in_thread: asyncio.AbstractEventLoop,
) -> None:
    health = Health("group")
    assert health.alive()  # no loop watched: the process answers
    health.watch_loop(loop_in_thread)
    assert health.alive()
    blocked = threading.Event()
    loop_in_thread.call_soon_threadsafe(lambda: blocked.wait(5))  # a synchronous call stalls the loop
    started = time.monotonic()
    assert not health.alive(timeout_s=0.3)
    assert time.monotonic() - started < 2
    blocked.set()
    assert health.alive()
    closed = asyncio.new_event_loop()
    closed.close()
    health.watch_loop(closed)
    assert not health.alive()


async def test_group_joined_marks_ready_with_or_without_partitions() -> None:
    health = Health("group")
    listener = GroupJoined(health, "lodestar-dispatchers")
    await listener.on_partitions_revoked(set())
    assert not health.ready
    await listener.on_partitions_assigned(set())  # an idle member of a group with more members than partitions
    assert health.ready
    assert health.conditions()["group"].detail == "member of group lodestar-dispatchers with 0 partitions"
    await listener.on_partitions_assigned({TopicPartition("t", 0), TopicPartition("t", 1)})
    assert "with 2 partitions" in health.conditions()["group"].detail


async def test_probes_served_beside_metrics() -> None:
    health = Health("group")
    metrics = LearnerMetrics(CollectorRegistry())
    metrics.events.inc()
    server = start_metrics_server(metrics.registry, _free_port(), health=health)  # probes this test's loop
    assert server is not None
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            not_ready = await http.get(f"{base}/readyz")
            assert not_ready.status_code == 503
            assert not_ready.json() == {"ready": False, "conditions": {"group": {"ready": False, "detail": "not yet"}}}
            health.set("group", True, "member of group g with 1 partitions")
            ready = await http.get(f"{base}/readyz")
            assert ready.status_code == 200 and ready.json()["ready"] is True
            alive = await http.get(f"{base}/healthz")  # awaited: the loop is free to answer the probe
            assert alive.status_code == 200 and alive.json() == {"alive": True}
            assert "lodestar_learner_events_total 1.0" in (await http.get(f"{base}/metrics")).text
    finally:
        server.close()


def test_healthz_fails_while_the_service_loop_is_blocked(loop_in_thread: asyncio.AbstractEventLoop) -> None:
    health = Health("group")

    async def start() -> object:
        return start_metrics_server(CollectorRegistry(), _free_port(), health=health)

    server = asyncio.run_coroutine_threadsafe(start(), loop_in_thread).result(5)
    base = f"http://127.0.0.1:{server.port}"  # type: ignore[attr-defined]
    try:
        assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
        blocked = threading.Event()
        loop_in_thread.call_soon_threadsafe(lambda: blocked.wait(10))
        stalled = httpx.get(f"{base}/healthz", timeout=5)
        blocked.set()
        assert stalled.status_code == 503 and stalled.json() == {"alive": False}
    finally:
        server.close()  # type: ignore[attr-defined]


def _settings(**dispatcher: str) -> Settings:
    return Settings(dispatcher=dispatcher, worker={"worker_id": "w1"}, snapshot_signing={"key": "h" * 40},
                    learner={"checkpoint_path": "/nonexistent/lodestar-test/checkpoint.json"})


async def _close(service: Dispatcher | LearnerService) -> None:
    """Release a service's clients that were built but never started."""
    await service.consumer.stop()
    await service.producer.stop()
    await service.redis.aclose()


async def test_dispatcher_model_condition_follows_its_policy() -> None:
    heuristic = Dispatcher(_settings(policy="least_request"))
    assert heuristic.health.conditions()["model"] == Condition(True, "policy least_request uses no model")
    assert not heuristic.health.ready  # not a member of its group yet
    learned = Dispatcher(_settings(policy="learned"))
    assert not learned.health.conditions()["model"].ready  # until a snapshot loads or the fallback is declared
    unusable = feature_snapshot("uncached_per_speed", 1.0, version=2)
    unusable = Snapshot(**{**unusable.__dict__, "arrays": {}})
    await learned._on_snapshot(unusable)  # noqa: SLF001 - the hook the snapshot watcher calls
    assert not learned.health.conditions()["model"].ready  # refused: nothing loaded yet
    await learned._on_snapshot(feature_snapshot("uncached_per_speed", 1.0, version=3))  # noqa: SLF001
    assert learned.health.conditions()["model"] == Condition(True, "model snapshot v3 loaded")
    for service in (heuristic, learned):
        await _close(service)


async def test_worker_is_not_ready_once_draining() -> None:
    worker = WorkerService(_settings())
    worker.health.set("engine", True, "answers")
    await GroupJoined(worker.health, worker.group_id).on_partitions_assigned(set())
    assert worker.health.ready
    worker.request_drain()
    assert not worker.health.ready
    assert worker.health.conditions()["group"].detail == "draining: takes no more work"
    await worker.engine.aclose()


async def test_learner_declares_its_group_condition() -> None:
    learner = LearnerService(_settings())
    assert set(learner.health.conditions()) == {"group"} and not learner.health.ready
    await _close(learner)
