"""The pipeline bench's arithmetic: open-loop arrivals, per-hop split, CPU reading, the exactly-once verdict."""

from __future__ import annotations

import os

import numpy as np
import pytest

from app.pipeline_bench import HOPS, Timed, cpu_seconds, poisson_stream, summarize_rate
from app.traffic import PhaseTally
from lodestar.schemas import InferenceResult, RoutingDecision, TelemetryEvent


def test_poisson_stream_rate_and_order() -> None:
    stream = poisson_stream(200.0, 20.0, 64, 4, seed=3, id_prefix="t")
    gaps = np.diff([t.at_s for t in stream])
    assert abs(len(stream) - 4000) < 4 * np.sqrt(4000)  # Poisson count within 4 sigma
    assert (gaps > 0).all()
    assert abs(np.std(gaps) / np.mean(gaps) - 1.0) < 0.1  # exponential gaps: coefficient of variation 1
    assert len({t.request.request_id for t in stream}) == len(stream)
    assert all(len(t.request.input_ids or []) == 64 for t in stream)


def test_cpu_seconds_reads_this_process_and_zero_when_gone() -> None:
    sum(i * i for i in range(200_000))
    assert cpu_seconds(os.getpid()) > 0.0
    assert cpu_seconds(2**22 + 12345) == 0.0


def _event(rid: str, decided_at: float, sent_at: float, policy: str) -> TelemetryEvent:
    decision = RoutingDecision(worker_id="w0", policy=policy, decided_at=decided_at)
    return TelemetryEvent(request_id=rid, decision=decision, gpu_type="H100", status="ok", sent_at=sent_at)


def test_summarize_rate_splits_the_overhead_by_hop() -> None:
    tally = PhaseTally("x")
    times: dict[str, Timed] = {}
    for k in range(10):
        rid = f"r{k}"
        t0 = 1_000_000.0 + 100 * k
        tally.sent.append(rid)
        times[rid] = Timed(t0, received_ms=t0 + 2 + 3 + 50 + 1 + 4)
        tally.add_event(_event(rid, decided_at=t0 + 2, sent_at=t0 + 5, policy="learned" if k < 8 else
                               "learned/gpu_speed_queue"))
        tally.add_result(InferenceResult(request_id=rid, worker_id="w0", status="ok", e2e_ms=50.0,
                                         completed_at=t0 + 56))
    row = summarize_rate(10.0, tally, times, {"dispatchers": 0.02}, wall_s=1.0, duplicates=0)
    assert row["overhead_ms"]["p50"] == pytest.approx(10.0)
    expected = dict(zip(HOPS, (2.0, 3.0, 50.0, 1.0, 4.0), strict=True))
    for hop, value in expected.items():
        assert row["hops_ms"][hop]["p99"] == pytest.approx(value)
    assert row["model_share"] == pytest.approx(0.8)
    assert row["cpu_ms_per_request"]["dispatchers"] == pytest.approx(2.0)
    assert row["routed_per_s"] == pytest.approx(9 / 0.9)
    assert row["answered"] == row["sent"] == 10 and row["unanswered"] == 0


def test_warmup_goes_through_every_rate_in_turn() -> None:
    from pathlib import Path

    from app.pipeline_bench import PipelineOptions, warmup_stream

    opts = PipelineOptions(cluster=Path("c.yaml"), rates=[10.0, 100.0], seconds=5.0, dispatchers=1, warmup_s=40.0,
                           prompt_tokens=32, max_new_tokens=2, time_scale=1.0, seed=1, request_timeout_s=5.0,
                           startup_timeout_s=5.0, out=Path("."))
    stream = warmup_stream(opts, "w")
    first = [t for t in stream if t.at_s < 20.0]
    second = [t for t in stream if t.at_s >= 20.0]
    assert 120 < len(first) < 290 and 1700 < len(second) < 2300  # 10/s then 100/s for 20 s each
    assert all(a.at_s <= b.at_s for a, b in zip(stream, stream[1:], strict=False))
    assert len({t.request.request_id for t in stream}) == len(stream)
