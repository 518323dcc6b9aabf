"""Per-worker TTFT correction from the workers' own recent TTFT: relative, smoothed, dead-banded."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from policy_views import cluster, request

from dispatcher.policies.learned import LearnedPolicy
from dispatcher.policies.worker_correction import MIN_ROUTED, WorkerCorrection
from lodestar.cluster_view import ClusterView


def view_at(now_ms: float, recent: list[float], ids: list[str] | None = None) -> ClusterView:
    v = cluster(len(recent), now_ms=now_ms)
    v.recent_ttft_ms = np.array(recent, dtype=np.float64)
    if ids is not None:
        v.worker_ids = ids
    return v


def feed(c: WorkerCorrection, recent: list[float], seconds: float, predicted: float = 100.0,
         start_ms: float = 0.0) -> np.ndarray:
    """Route to every worker in turn (prediction `predicted`) for `seconds`, 10 decisions/s."""
    f = np.ones(len(recent))
    for k in range(int(seconds * 10)):
        f = c.factors(view_at(start_ms + k * 100.0, recent))
        c.routed(k % len(recent), predicted)
    return f


def test_no_evidence_no_correction() -> None:
    c = WorkerCorrection()
    assert np.all(c.factors(view_at(0.0, [0.0, 0.0, 0.0])) == 1.0)
    # fewer than MIN_ROUTED requests per worker: not trusted yet
    f = feed(c, [300.0, 100.0, 100.0], seconds=0.1 * (MIN_ROUTED * 3 - 1))
    assert np.all(f == 1.0)


def test_a_worker_twice_as_slow_as_predicted_is_corrected_and_the_others_are_not() -> None:
    c = WorkerCorrection(time_constant_s=5.0, dead_band=0.2)
    f = feed(c, [200.0, 100.0, 100.0, 100.0], seconds=60.0)
    assert f[0] == pytest.approx(math.exp(math.log(2.0) - 0.2), rel=0.01)
    assert np.all(f[1:] == 1.0)


def test_a_common_bias_changes_nothing() -> None:
    f = feed(WorkerCorrection(), [300.0, 300.0, 300.0], seconds=60.0)
    assert np.all(f == 1.0)


def test_noise_inside_the_dead_band_changes_nothing_and_the_correction_is_gradual() -> None:
    c = WorkerCorrection(time_constant_s=5.0, dead_band=0.2)
    assert np.all(feed(c, [115.0, 100.0, 100.0], seconds=60.0) == 1.0)  # log 1.15 = 0.14 < 0.2
    slow = WorkerCorrection(time_constant_s=5.0, dead_band=0.0)
    after_one_s = feed(slow, [200.0, 100.0, 100.0], seconds=MIN_ROUTED * 0.3 + 1.0)
    assert 1.0 < after_one_s[0] < 1.5  # one time constant takes ~63% of log 2


def test_state_follows_worker_ids_and_fades_when_evidence_stops() -> None:
    c = WorkerCorrection(time_constant_s=1.0, dead_band=0.0, forget_s=10.0)
    feed(c, [400.0, 100.0, 100.0], seconds=30.0)
    f = c.factors(view_at(30_000.0, [100.0, 100.0, 400.0], ids=["w2", "w1", "w0"]))  # reordered
    assert f[2] == pytest.approx(4.0, rel=0.05) and f[0] == pytest.approx(1.0, abs=0.05)
    # no recent TTFT reported any more (e.g. the worker restarted): the correction fades with forget_s
    f = c.factors(view_at(60_000.0, [0.0, 0.0, 0.0], ids=["w2", "w1", "w0"]))
    assert f[2] == pytest.approx(math.exp(math.log(4.0) * math.exp(-3.0)), rel=0.05)


def test_the_policy_routes_around_a_slow_worker_it_has_measured() -> None:
    """Two identical idle A100s: a tie, both used, until w0 reports TTFTs 3x what was predicted."""
    p = LearnedPolicy(seed=1)
    req = request(1000)
    assert {p.choose(req, view_at(k * 100.0, [0.0, 0.0])).worker_id for k in range(20)} == {"w0", "w1"}
    est = p.choose(req, view_at(2_000.0, [0.0, 0.0])).predicted_ttft_ms
    assert est is not None
    picks = [p.choose(req, view_at(2_000.0 + k * 100.0, [3 * est, est])).worker_id for k in range(600)]
    assert picks[-100:].count("w0") == 0


def test_with_no_time_passed_the_factors_are_the_last_ones_as_a_full_evaluation_gives_them() -> None:
    """Decisions of one batch share their view's clock: the factors are returned as they were, and equal (to
    the bit) what advancing the state by zero seconds computes, whatever was routed in between."""
    c = WorkerCorrection(time_constant_s=1.0, dead_band=0.05)
    feed(c, [300.0, 100.0, 150.0, 90.0], seconds=20.0)
    v = view_at(20_000.0, [310.0, 95.0, 150.0, 0.0])
    first = c.factors(v)
    for i in (0, 1, 1, 3):
        c.routed(i, 120.0)
    again = c.factors(v)
    fresh = copy.deepcopy(c)
    fresh._factors = None  # forces the full evaluation at dt = 0
    assert np.array_equal(again, first) and np.array_equal(fresh.factors(v), first)
    assert not np.all(first == 1.0)
