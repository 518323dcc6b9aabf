"""Round robin, random, least request, power of two: hand-worked cases from their anchors' rules."""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from policy_views import cluster, request

from dispatcher.policies.baselines.common import argmin_random_tie, argmin_random_tie_array
from dispatcher.policies.baselines.simple import LeastRequest, PowerOfTwo, RoundRobin, UniformRandom


def test_round_robin_cycles_through_workers_from_the_seed_phase() -> None:
    view, req = cluster(3), request(64)
    policy = RoundRobin()
    assert [policy.choose(req, view).index for _ in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    shifted = RoundRobin(seed=5)
    assert [shifted.choose(req, view).index for _ in range(3)] == [2, 0, 1]


def test_round_robin_ignores_load() -> None:
    policy = RoundRobin()
    view = cluster(2, inflight=[100, 0])
    assert [policy.choose(request(64), view).index for _ in range(2)] == [0, 1]


def test_random_is_seeded_and_covers_every_worker() -> None:
    view, req = cluster(4), request(64)
    p1, p2 = UniformRandom(seed=1), UniformRandom(seed=1)
    seq1 = [p1.choose(req, view).index for _ in range(200)]
    seq2 = [p2.choose(req, view).index for _ in range(200)]
    assert seq1 == seq2
    assert set(seq1) == {0, 1, 2, 3}
    p3 = UniformRandom(seed=2)
    assert [p3.choose(req, view).index for _ in range(200)] != seq1


def test_least_request_picks_the_fewest_outstanding_requests() -> None:
    view = cluster(3, inflight=[5, 2, 7])
    decision = LeastRequest().choose(request(64), view)
    assert decision.index == 1 and decision.worker_id == "w1"
    assert decision.scores.tolist() == [-5, -2, -7]


def test_least_request_counts_engine_reported_requests_when_inflight_lags() -> None:
    # w0 reports 6 running + waiting although the router's in-flight count still says 1.
    view = cluster(2, inflight=[1, 3], running=[4, 3], waiting=[2, 0])
    assert LeastRequest().choose(request(64), view).index == 1


def test_least_request_breaks_ties_at_random_but_reproducibly() -> None:
    view, req = cluster(3, inflight=[1, 4, 1]), request(64)
    picks = [LeastRequest(seed=s).choose(req, view).index for s in range(40)]
    assert set(picks) == {0, 2}
    assert picks == [LeastRequest(seed=s).choose(req, view).index for s in range(40)]


def test_power_of_two_with_two_workers_always_takes_the_less_loaded() -> None:
    policy = PowerOfTwo(seed=3)
    view = cluster(2, inflight=[9, 4])
    assert {policy.choose(request(64), view).index for _ in range(50)} == {1}


def test_power_of_two_never_picks_the_most_loaded_of_three() -> None:
    policy = PowerOfTwo(seed=11)
    view = cluster(3, inflight=[0, 5, 10])
    counts = Counter(policy.choose(request(64), view).index for _ in range(3000))
    assert counts[2] == 0
    # Worker 0 wins every pair it is drawn into: 2 of the 3 equally likely pairs.
    assert counts[0] / 3000 == pytest.approx(2 / 3, abs=0.04)


def test_power_of_two_scores_only_the_two_sampled_workers() -> None:
    decision = PowerOfTwo(seed=0).choose(request(64), cluster(5, inflight=[1, 2, 3, 4, 5]))
    finite = [s for s in decision.scores if s != float("-inf")]
    assert len(finite) == 2 and -decision.scores[decision.index] == min(-s for s in finite)


def test_power_of_two_with_one_worker() -> None:
    assert PowerOfTwo().choose(request(64), cluster(1, inflight=[3])).index == 0


def test_empty_cluster_is_an_error() -> None:
    with pytest.raises(ValueError):
        LeastRequest().choose(request(64), cluster(0))


def test_the_array_argmin_is_the_list_argmin_with_the_same_draws() -> None:
    """argmin_random_tie_array: the index and the random draws of argmin_random_tie, NaN included (where the
    list version fails, so does the array version)."""

    def outcome(pick: Callable[[], int]) -> int | str:
        try:
            return pick()
        except ValueError as exc:
            return str(exc)

    rng = random.Random(0)
    for _ in range(500):
        values = np.array([rng.choice([1.0, 2.0, 3.0, rng.random(), math.nan if rng.random() < 0.1 else 4.0])
                           for _ in range(rng.randint(1, 9))])
        a, b = random.Random(7), random.Random(7)
        assert outcome(lambda: argmin_random_tie_array(values, a)) == outcome(  # noqa: B023
            lambda: argmin_random_tie(values.tolist(), b))  # noqa: B023
        assert a.random() == b.random()
