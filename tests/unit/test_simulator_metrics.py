"""bench_serving metric definitions on hand-made completions."""

from __future__ import annotations

import numpy as np
import pytest

from lodestar.cluster_view import Decision, RequestInfo
from sim.metrics import summarize, weighted_percentiles
from sim.records import CompletedRequest


def _done(rid: str, arrival: float, first: float, finished: float, out: int, prompt: int = 100,
          cached: int = 0, gpu: str = "A100") -> CompletedRequest:
    return CompletedRequest(RequestInfo(rid, prompt), Decision(0, "a100-0", "x"), gpu, None, 0, arrival, first,
                            finished, prompt, cached, out, "length")


def test_ttft_tpot_e2e_follow_bench_serving() -> None:
    recs = [_done("a", 0.0, 0.2, 1.2, 11), _done("b", 1.0, 1.5, 1.5, 1, cached=50)]
    assert recs[0].ttft_s == pytest.approx(0.2)
    assert recs[0].tpot_s == pytest.approx(0.1)  # (1.2 - 0.2) / (11 - 1)
    assert recs[1].tpot_s is None  # one output token: no TPOT, as bench_serving
    m = summarize(recs, np.array([0.01]), np.array([10]), ["A100", "L4", "A100", "A100"], ["A100", "L4", "H100"])
    assert m["completed"] == 2
    assert m["ttft_mean_ms"] == pytest.approx(350.0)
    assert m["ttft_p50_ms"] == pytest.approx(350.0)
    assert m["tpot_mean_ms"] == pytest.approx(100.0)
    assert m["e2e_mean_ms"] == pytest.approx((1200.0 + 500.0) / 2)
    assert m["duration_s"] == pytest.approx(1.5)
    assert m["request_throughput"] == pytest.approx(2 / 1.5)
    assert m["output_throughput"] == pytest.approx(12 / 1.5)
    assert m["prefix_hit_rate"] == pytest.approx(50 / 200)
    assert m["load_share"] == {"A100": 0.75, "L4": 0.25, "H100": 0.0}


def test_itl_is_weighted_by_tokens() -> None:
    m = summarize([_done("a", 0, 1, 2, 5)], np.array([0.010, 0.100]), np.array([99, 1]), ["A100"], ["A100"])
    assert m["itl_mean_ms"] == pytest.approx((99 * 10 + 100) / 100)
    assert m["itl_p50_ms"] == pytest.approx(10.0)
    assert m["itl_p99_ms"] == pytest.approx(10.0)


def test_weighted_percentiles_match_repeated_values() -> None:
    rng = np.random.default_rng(0)
    values = rng.random(50)
    weights = rng.integers(1, 5, 50)
    repeated = np.repeat(values, weights)
    got = weighted_percentiles(values, weights.astype(float), [10, 50, 90, 99])
    want = np.percentile(repeated, [10, 50, 90, 99], method="inverted_cdf")
    assert got == pytest.approx(list(want))


def test_empty_run_reports_zeros() -> None:
    m = summarize([], np.zeros(0), np.zeros(0, dtype=np.int64), [], ["A100"], failed=3)
    assert m["completed"] == 0 and m["failed"] == 3
    assert m["ttft_mean_ms"] == 0.0 and m["request_throughput"] == 0.0
