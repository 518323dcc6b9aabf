"""The learner's span and metrics, on the service object with a fake producer and snapshot store (no broker,
no Redis): a batch is learned in one `learn` span linked to each telemetry message's trace, and the
counters and the online-error gauges move."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import numpy as np
import pytest
from aiokafka import ConsumerRecord

from learner.service import LearnerService
from lodestar import tracing
from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.features import as_dict, candidate_matrix
from lodestar.schemas import RoutingDecision, TelemetryEvent
from lodestar.settings import Settings
from lodestar.snapshot import Snapshot

TOPIC = "lodestar.telemetry"


class FakeProducer:
    """Counts what would have gone to the dead-letter topic."""

    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[None]:
        self.sent.append(topic)
        acked: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        acked.set_result(None)
        return acked


class FakeSnapshotStore:
    """Accepts every snapshot."""

    def __init__(self) -> None:
        self.published: list[int] = []

    async def publish(self, snapshot: Snapshot) -> None:
        self.published.append(snapshot.version)


def telemetry_value(i: int, rng: np.random.Generator) -> bytes:
    """A completed request whose TTFT grows with its uncached prompt."""
    info = RequestInfo(f"r{i}", prompt_tokens=int(rng.integers(50, 4000)))
    features = as_dict(candidate_matrix(info, ClusterView.empty_like(["w"], ["H100"]))[0])
    ttft = 20.0 + features["uncached_per_speed"] * 0.05
    event = TelemetryEvent(request_id=info.request_id, decision=RoutingDecision(worker_id="w", policy="p",
                                                                                 features=features),
                           gpu_type="H100", status="ok", ttft_ms=ttft, e2e_ms=ttft + 300.0)
    return event.to_bytes()


def record(offset: int, value: bytes, headers: tracing.Headers) -> ConsumerRecord:
    return ConsumerRecord(topic=TOPIC, partition=0, offset=offset, timestamp=0, timestamp_type=0, key=b"w",
                          value=value, checksum=None, serialized_key_size=1, serialized_value_size=len(value),
                          headers=headers)


@pytest.fixture
def mem() -> tracing.InMemoryTracing:
    return tracing.in_memory_tracing()


@pytest.fixture
async def service(tmp_path: Path, mem: tracing.InMemoryTracing) -> LearnerService:
    settings = Settings(learner={"model": "river", "checkpoint_path": tmp_path / "checkpoint.json"}, dev_mode=True)
    learner = LearnerService(settings)
    learner.tracer = mem.tracer("learner")
    learner.producer = learner.dead_letters.producer = FakeProducer()  # type: ignore[assignment]
    learner.snapshots = FakeSnapshotStore()  # type: ignore[assignment]
    return learner


def sample(service: LearnerService, name: str, **labels: str) -> float | None:
    return service.metrics.registry.get_sample_value(name, labels)


async def test_a_batch_is_learned_in_one_span_linked_to_every_request(
    service: LearnerService, mem: tracing.InMemoryTracing
) -> None:
    rng = np.random.default_rng(0)
    workers = mem.tracer("worker")
    serves = [workers.start_span(f"serve r{i}") for i in range(40)]
    records = [record(i, telemetry_value(i, rng), tracing.headers_for(span)) for i, span in enumerate(serves)]
    records.append(record(40, b"{not telemetry", []))
    for span in serves:
        span.end()

    await service.handle_records(records)

    (learn,) = [s for s in mem.exporter.get_finished_spans() if s.name == f"{tracing.OP_LEARN} {TOPIC}"]
    assert learn.parent is None
    assert [link.context.span_id for link in learn.links] == [s.get_span_context().span_id for s in serves]
    assert all(link.context.trace_id != learn.context.trace_id for link in learn.links)
    assert sample(service, "lodestar_learner_events_total") == 40
    assert sample(service, "lodestar_learner_rejected_total", reason="invalid_telemetry") == 1
    assert service.producer.sent == ["lodestar.dlq"]  # type: ignore[attr-defined]
    abs_error = sample(service, "lodestar_learner_online_abs_error_seconds")
    relative_error = sample(service, "lodestar_learner_online_relative_error")
    assert abs_error is not None and math.isfinite(abs_error) and abs_error >= 0
    assert relative_error is not None and math.isfinite(relative_error) and relative_error >= 0


async def test_a_published_snapshot_is_counted_with_its_version(service: LearnerService) -> None:
    rng = np.random.default_rng(1)
    await service.handle_records([record(i, telemetry_value(i, rng), []) for i in range(10)])
    assert sample(service, "lodestar_learner_snapshots_published_total") == 0
    snapshot = service.learner.snapshot(time.time())
    await service._publish(snapshot)
    assert sample(service, "lodestar_learner_snapshots_published_total") == 1
    assert sample(service, "lodestar_learner_snapshot_version") == snapshot.version
