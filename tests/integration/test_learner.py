"""The learner on the real broker and Redis: learns telemetry, publishes snapshots a running dispatcher
picks up, refuses nonsense to the DLQ, and resumes from its checkpoint after a restart."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import signal
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from dispatcher_harness import (
    FakeWorkers,
    dispatch_settings,
    produce_requests,
    running_dispatcher,
    running_learner,
    wait_until,
)
from emulator_process import LODESTAR, ROOT, free_port
from prometheus_client.parser import text_string_to_metric_families
from worker_harness import (
    TopicReader,
    isolated_settings,
    produce,
    require_services,
    settings_env,
    snapshot_store,
)

from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.features import as_dict, candidate_matrix
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.names import RedisKeys, Topics
from lodestar.redis_io import make_redis
from lodestar.schemas import InferenceRequest, RoutedRequest, RoutingDecision, TelemetryEvent
from lodestar.settings import Settings
from lodestar.snapshot import SigningKey
from lodestar.snapshot_store import SnapshotStore, StaleSnapshotVersion

pytestmark = pytest.mark.integration


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    require_services(isolated_settings())
    s = dispatch_settings(policy="learned")
    s.learner = s.learner.model_copy(update={
        "model": "river", "snapshot_every_events": 150, "snapshot_every_s": 3600.0,
        "checkpoint_path": tmp_path / "learner" / "checkpoint.json",
    })
    return s


async def learned_events(metrics_port: int) -> float | None:
    """The learner process's count of events learned, from its /metrics (None until it answers)."""
    try:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2.0)).text
    except httpx.HTTPError:
        return None
    for family in text_string_to_metric_families(text):
        if family.name == "lodestar_learner_events":
            return sum(s.value for s in family.samples if s.name == "lodestar_learner_events_total")
    return None


def telemetry(n: int, seed: int) -> list[TelemetryEvent]:
    """Completed requests whose TTFT grows with uncached tokens and queue, slower on slower GPUs."""
    rng = np.random.default_rng(seed)
    gpus = ["H100", "A100", "L4"]
    out = []
    for i in range(n):
        view = ClusterView.empty_like(["w"], [gpus[i % 3]])
        view.waiting[:] = rng.integers(0, 6)
        view.running[:] = rng.integers(0, 20)
        info = RequestInfo(f"r{seed}-{i}", prompt_tokens=int(rng.integers(50, 4000)))
        row = candidate_matrix(info, view)[0]
        features = as_dict(row)
        ttft = 20.0 + features["uncached_per_speed"] * 0.05 + features["queue_per_speed"] * 30.0
        decision = RoutingDecision(worker_id="w", policy="test", features=features)
        out.append(TelemetryEvent(request_id=info.request_id, decision=decision, gpu_type=gpus[i % 3],
                                  status="ok", ttft_ms=float(ttft), e2e_ms=float(ttft) + 500.0))
    return out


async def produce_telemetry(settings: Settings, events: list[TelemetryEvent]) -> None:
    await produce(settings, Topics(settings.kafka.topic_prefix).telemetry, [e.to_bytes() for e in events])


async def test_a_running_dispatcher_picks_up_the_learners_snapshot(settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    async with FakeWorkers(settings) as workers:
        await workers.add("wa", "H100")
        await workers.add("wb", "L4")
        async with running_dispatcher(settings) as dispatcher, running_learner(settings) as learner:
            assert dispatcher.model_version == 0
            await produce_telemetry(settings, telemetry(320, seed=1))
            await wait_until(lambda: learner.stats.snapshots >= 2, 60, "two snapshots")
            await wait_until(lambda: dispatcher.model_version == learner.version, 10, "the dispatcher to reload")
            assert learner.version == 2
            # a snapshot signed with another key is ignored: the dispatcher keeps what it has
            good = await dispatcher.snapshots.load()
            assert good is not None and good.version == 2
            attacker = make_redis(settings)
            try:
                await SnapshotStore(attacker, RedisKeys(settings.redis.key_prefix),
                                    signing_key=SigningKey(settings.snapshot_signing.key_id, b"wrong-key" * 4),
                                    ).publish(dataclasses.replace(good, version=99))
            finally:
                await attacker.aclose()
            await asyncio.sleep(0.5)
            assert dispatcher.model_version == 2
            request = InferenceRequest(prompt="route me with the model " * 10)
            async with TopicReader(settings, topics.worker("wa"), topics.worker("wb")) as reader:
                await produce_requests(settings, [request])
                await reader.wait_for(lambda m: sum(map(len, m.values())) >= 1, timeout=30)
    (routed,) = [RoutedRequest.model_validate(m) for msgs in reader.messages.values() for m in msgs]
    assert routed.decision.model_version == 2
    assert routed.decision.policy.startswith("learned")


async def test_nonsense_telemetry_goes_to_the_dlq_with_its_reason(settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    good = telemetry(1, seed=2)[0]
    negative = json.loads(good.to_bytes())
    negative["ttft_ms"] = -5.0
    absurd = good.model_copy(update={"ttft_ms": settings.learner.max_latency_ms * 10})
    missing = json.loads(good.to_bytes())
    del missing["decision"]["features"]["gpu_speed"]
    unknown = json.loads(good.to_bytes())
    unknown["schema_version"] = 3
    bad = [json.dumps(negative).encode(), absurd.to_bytes(), json.dumps(missing).encode(),
           json.dumps(unknown).encode()]
    async with running_learner(settings) as learner, TopicReader(settings, topics.dlq) as reader:
        await produce(settings, topics.telemetry, [*bad, good.to_bytes()])
        await reader.wait_for(lambda m: len(m[topics.dlq]) >= 4, timeout=30)
        await wait_until(lambda: learner.stats.events == 5, 10, "all five events")
    reasons = " | ".join(m["reason"] for m in reader.messages[topics.dlq])
    for expected in ("ttft_ms: Input should be greater than or equal to 0", "beyond max_latency_ms",
                     "features missing: gpu_speed", "schema_version"):
        assert expected in reasons
    assert all(m["service"] == "learner" and m["stage"] == "validate" for m in reader.messages[topics.dlq])
    assert learner.stats.learned == 1 and learner.stats.dead_letters == 4


async def test_a_restarted_learner_resumes_from_its_checkpoint(settings: Settings) -> None:
    await ensure_topics(settings, fixed_topic_partitions(settings))
    store_client = make_redis(settings)
    store = snapshot_store(settings, store_client)
    try:
        async with running_learner(settings) as first:
            await produce_telemetry(settings, telemetry(200, seed=3))
            await wait_until(lambda: first.stats.snapshots >= 1 and first.stats.events == 200, 60, "a snapshot")
        first_version = first.version
        assert first_version == first.stats.snapshots  # versions count published snapshots from 1
        assert settings.learner.checkpoint_path.exists()
        saved = json.loads(settings.learner.checkpoint_path.read_text())
        assert saved["counters"]["n_seen"] == 200 and saved["counters"]["version"] == first_version
        started = time.monotonic()
        async with running_learner(settings) as second:
            assert second.learner.n_seen == 200 and second.version == first_version  # resumed, not from zero
            await produce_telemetry(settings, telemetry(150, seed=4))
            await wait_until(lambda: second.stats.snapshots >= 1 and second.stats.events == 150, 60,
                             "a snapshot after the restart")
            assert second.stats.events == 150  # committed offsets: the first 200 are not consumed again
        assert second.learner.n_seen == 350 and second.version == first_version + second.stats.snapshots
        assert await store.stored_version() == second.version
        current = await store.load()
        assert current is not None
        with pytest.raises(StaleSnapshotVersion):  # nobody can roll the model back
            await store.publish(dataclasses.replace(current, version=first_version))
        assert time.monotonic() - started < 60
    finally:
        await store_client.aclose()


async def test_the_lodestar_learner_command_publishes_and_checkpoints_on_sigterm(settings: Settings) -> None:
    await ensure_topics(settings, fixed_topic_partitions(settings))
    metrics_port = free_port()
    # Only a snapshot (every 150 events) or the stop checkpoints: no time-based checkpoint in between.
    env = {**settings_env(settings), "LODESTAR_LEARNER__CONSUMER_GROUP": settings.learner.consumer_group,
           "LODESTAR_LEARNER__SNAPSHOT_EVERY_EVENTS": "150",
           "LODESTAR_LEARNER__WARMUP_SNAPSHOT_EVERY_EVENTS": "150", "LODESTAR_LEARNER__SNAPSHOT_EVERY_S": "3600",
           "LODESTAR_LEARNER__METRICS_PORT": str(metrics_port)}
    client = make_redis(settings)
    store = snapshot_store(settings, client)
    path = settings.learner.checkpoint_path
    proc = await asyncio.create_subprocess_exec(
        LODESTAR, "learner", "--model", "river", "--checkpoint-path", str(path), env=env, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        await produce_telemetry(settings, telemetry(170, seed=5))
        deadline = time.monotonic() + 90
        # Stop only once all 170 are learned (not merely once v1 is stored, which may be before the last 20
        # are polled), so the stop is what checkpoints the 20 events after the snapshot.
        while await store.stored_version() != 1 or await learned_events(metrics_port) != 170:
            assert time.monotonic() < deadline, "the learner command did not learn 170 events and publish v1"
            await asyncio.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 60)
        await client.aclose()
    assert proc.returncode == 0, stderr.decode()[-2000:]
    saved = json.loads(path.read_text())
    assert saved["counters"]["n_seen"] == 170  # the 20 events after the snapshot were checkpointed at stop
    assert b"published snapshot v1" in stderr
