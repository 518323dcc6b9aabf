"""Every baseline: registered by name, seeded-deterministic, side-effect free on the view, well-formed."""

from __future__ import annotations

import random

import numpy as np
import pytest
from policy_views import cluster, request

import dispatcher.policies.baselines  # noqa: F401  (registers the baselines)
from dispatcher.policies.base import _REGISTRY, Policy

BASELINES = [
    "round_robin", "random", "least_request", "power_of_two", "sglang_cache_aware", "aibrix_prefix_cache",
    "aibrix_prefix_load", "dynamo_kv_cost", "llmd_weighted", "lmetric", "gpu_speed_queue",
]


def random_views(seed: int, count: int):
    """A stream of (request, view) pairs with varied loads, prefixes, GPU types and cluster sizes."""
    rng = random.Random(seed)
    gpus = ["H100", "A100", "L40S", "L4"]
    for t in range(count):
        n = rng.choice([1, 2, 5, 8, 16])
        prompt = rng.randint(1, 4000)
        yield request(prompt, request_id=f"r{t}"), cluster(
            n,
            gpu_types=[rng.choice(gpus) for _ in range(n)],
            running=[rng.randint(0, 20) for _ in range(n)],
            waiting=[rng.choice([0, 0, rng.randint(0, 30)]) for _ in range(n)],
            inflight=[rng.randint(0, 60) for _ in range(n)],
            pending_prefill_tokens=[rng.randint(0, 20000) for _ in range(n)],
            kv_usage=[rng.random() for _ in range(n)],
            max_kv_tokens=[rng.choice([100_000, 400_000]) for _ in range(n)],
            matched=[16 * rng.randint(0, prompt // 16) for _ in range(n)],
            now_ms=1000.0 * t,
        )


@pytest.mark.parametrize("name", BASELINES)
def test_registered_under_its_name(name: str) -> None:
    policy = _REGISTRY[name](seed=7)
    assert isinstance(policy, Policy)
    assert policy.name == name


@pytest.mark.parametrize("name", BASELINES)
def test_same_seed_same_choices(name: str) -> None:
    a, b = _REGISTRY[name](seed=5), _REGISTRY[name](seed=5)
    for req, view in random_views(seed=1, count=150):
        da, db = a.choose(req, view), b.choose(req, view)
        assert (da.index, da.worker_id) == (db.index, db.worker_id)
        np.testing.assert_array_equal(da.scores, db.scores)


@pytest.mark.parametrize("name", BASELINES)
def test_decisions_are_well_formed_and_leave_the_view_untouched(name: str) -> None:
    policy = _REGISTRY[name](seed=3)
    for req, view in random_views(seed=2, count=150):
        before = {k: getattr(view, k).copy() for k in ("running", "waiting", "inflight", "pending_prefill_tokens",
                                                        "kv_usage", "matched_prefix_tokens", "gpu_speed")}
        d = policy.choose(req, view)
        assert 0 <= d.index < view.size
        assert d.worker_id == view.worker_ids[d.index] and d.policy == name
        assert d.scores.shape == (view.size,)
        assert np.isfinite(d.scores[d.index])
        assert d.scores[d.index] == d.scores.max()  # scores: higher is preferred
        for key, value in before.items():
            np.testing.assert_array_equal(getattr(view, key), value)
