"""The dispatcher's Prometheus series move with its work, on the real broker and Redis with fake-heartbeated
workers: decisions by policy and worker, routing latency, batch sizes, dead letters, the snapshot in use."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from dispatcher_harness import (
    FakeWorkers,
    dispatch_settings,
    produce_requests,
    running_dispatcher,
    shared_prefix_requests,
    wait_until,
)
from worker_harness import cleanup, produce, snapshot_store

from learner.trainer import LearnerConfig, make_learner
from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.features import candidate_matrix
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.metrics import DispatcherMetrics
from lodestar.names import Topics
from lodestar.redis_io import make_redis
from lodestar.settings import Settings

pytestmark = pytest.mark.integration


def value(metrics: DispatcherMetrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


async def test_routing_moves_the_decision_latency_batch_and_dlq_series(kafka_bootstrap: str, redis_url: str) -> None:
    settings = dispatch_settings()
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    metrics = DispatcherMetrics()
    requests = shared_prefix_requests(20)
    try:
        async with FakeWorkers(settings) as workers:
            await workers.add("wa", "H100")
            await workers.add("wb", "A100", running=3)
            await produce_requests(settings, requests)
            await produce(settings, topics.requests, [b"{not a request"])
            async with running_dispatcher(settings, metrics=metrics) as service:
                await wait_until(lambda: service.stats.routed == len(requests) and service.stats.dead_letters == 1,
                                 30, "routing")
    finally:
        await cleanup(settings)

    by_worker = {w: value(metrics, "lodestar_dispatcher_decisions_total", policy="least_request", worker=w)
                 for w in ("wa", "wb")}
    assert sum(by_worker.values()) == len(requests) and all(by_worker.values())  # least-request spreads the load
    assert value(metrics, "lodestar_dispatcher_explored_total") == 0
    assert value(metrics, "lodestar_dispatcher_routing_latency_seconds_count") == len(requests)
    assert value(metrics, "lodestar_dispatcher_routing_latency_seconds_sum") > 0
    assert value(metrics, "lodestar_dispatcher_batch_size_sum") == len(requests) + 1  # the invalid one too
    assert value(metrics, "lodestar_dispatcher_batch_size_count") >= 1
    assert value(metrics, "lodestar_dispatcher_dlq_total", reason="invalid_request") == 1
    assert value(metrics, "lodestar_dispatcher_snapshot_version") == 0
    assert math.isnan(value(metrics, "lodestar_dispatcher_snapshot_age_seconds"))


async def publish_snapshot(settings: Settings) -> int:
    """A river model trained on a little synthetic telemetry, published as the learner would."""
    rng = np.random.default_rng(2)
    learner = make_learner("river", LearnerConfig.from_settings(settings.learner))
    for i in range(300):
        view = ClusterView.empty_like(["w"], ["H100"])
        view.running[:] = rng.integers(0, 10)
        x = candidate_matrix(RequestInfo("r", prompt_tokens=int(rng.integers(16, 2048))), view)[0]
        learner.observe(x, 20.0 + float(rng.uniform(0, 50)), float(i))
    snapshot = learner.snapshot(time.time())
    client = make_redis(settings)
    try:
        await snapshot_store(settings, client).publish(snapshot)
    finally:
        await client.aclose()
    return snapshot.version


async def test_the_snapshot_in_use_is_exposed_with_its_age(kafka_bootstrap: str, redis_url: str) -> None:
    settings = dispatch_settings(policy="learned")
    await ensure_topics(settings, fixed_topic_partitions(settings))
    metrics = DispatcherMetrics()
    try:
        version = await publish_snapshot(settings)
        async with running_dispatcher(settings, metrics=metrics) as service:
            await wait_until(lambda: service.model_version == version, 10, "the snapshot")
    finally:
        await cleanup(settings)
    assert value(metrics, "lodestar_dispatcher_snapshot_version") == version
    age = value(metrics, "lodestar_dispatcher_snapshot_age_seconds")
    assert 0 <= age < 60
