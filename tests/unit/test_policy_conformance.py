"""One suite for every policy of the registry (the way river checks every estimator): a new policy module
is checked here without being named. Each policy, on generated cluster views: built by name, seeded-
deterministic, leaves the view untouched, makes well-formed decisions, and documents its parameters."""

from __future__ import annotations

import numpy as np
import pytest
from policy_views import random_views

from dispatcher.policies.base import Policy, SnapshotPolicy
from dispatcher.policies.registry import RUN_PARAMS, heuristic_names, make_policy, policy_class, policy_names
from lodestar.features import FEATURE_NAMES, candidate_matrix
from lodestar.params import ParamsError, describe, validate_params
from lodestar.snapshot import Snapshot

VIEW_FIELDS = ("running", "waiting", "inflight", "pending_prefill_tokens", "kv_usage", "max_kv_tokens",
               "recent_ttft_ms", "matched_prefix_tokens", "gpu_speed")


def snapshot() -> Snapshot:
    """A validated linear model of TTFT in the uncached and backlog work per unit of speed, trained on a
    range that the generated views leave now and then (so the fallback runs too)."""
    names = ("uncached_per_speed", "backlog_tokens_per_speed")
    return Snapshot(
        version=3, family="river", kind="dense", feature_names=names,
        arrays={"x_center": np.zeros(2), "x_inv_scale": np.ones(2), "layer0_w": np.array([[0.2], [0.05]]),
                "layer0_b": np.array([5.0]), "feature_min": np.zeros(2), "feature_max": np.array([4000.0, 40000.0])},
        meta={"layers": 1, "log1p_features": [], "range_margin": 0.1, "validated": True,
              "target": {"transform": "identity", "center": 0.0, "scale": 1.0}},
    )


def build(name: str, seed: int) -> Policy:
    """The policy with its default parameters; a policy that follows snapshots gets one."""
    policy = make_policy(name, seed=seed)
    if isinstance(policy, SnapshotPolicy):
        policy.load_snapshot(snapshot())
    return policy


def test_the_registry_finds_every_policy_module() -> None:
    names = policy_names()
    assert names == sorted(names) and len(names) == len(set(names))
    assert {"learned", "gpu_speed_queue", "round_robin", "lmetric"} <= set(names)
    assert "learned" not in heuristic_names() and set(heuristic_names()) == set(names) - {"learned"}
    with pytest.raises(KeyError, match="unknown policy 'nope'; known: "):
        make_policy("nope")


@pytest.mark.parametrize("name", policy_names())
def test_built_by_name(name: str) -> None:
    policy = build(name, seed=7)
    assert isinstance(policy, Policy) and type(policy) is policy_class(name)
    assert policy.name == name


@pytest.mark.parametrize("name", policy_names())
def test_same_seed_same_decisions(name: str) -> None:
    a, b = build(name, seed=5), build(name, seed=5)
    for req, view in random_views(seed=1, count=150):
        da, db = a.choose(req, view), b.choose(req, view)
        assert (da.index, da.worker_id, da.policy, da.explored, da.fallback) == (
            db.index, db.worker_id, db.policy, db.explored, db.fallback)
        np.testing.assert_array_equal(da.scores, db.scores)


@pytest.mark.parametrize("name", policy_names())
def test_decisions_are_well_formed_and_leave_the_view_untouched(name: str) -> None:
    policy = build(name, seed=3)
    for req, view in random_views(seed=2, count=150):
        before = {k: getattr(view, k).copy() for k in VIEW_FIELDS}
        ids = list(view.worker_ids)
        d = policy.choose(req, view)
        assert 0 <= d.index < view.size and d.worker_id == view.worker_ids[d.index]
        assert d.policy == name or (d.fallback and d.policy.startswith(f"{name}/"))
        if d.scores is not None:
            assert d.scores.shape == (view.size,) and np.isfinite(d.scores[d.index])
            assert d.explored or d.scores[d.index] == d.scores.max()  # scores: higher is preferred
        if d.features is not None:
            assert d.features.shape == (len(FEATURE_NAMES),)
            np.testing.assert_array_equal(d.features, candidate_matrix(req, view)[d.index])
        for key, value in before.items():
            np.testing.assert_array_equal(getattr(view, key), value)
        assert view.worker_ids == ids


@pytest.mark.parametrize("name", policy_names())
def test_parameters_are_documented_and_their_defaults_valid(name: str) -> None:
    cls = policy_class(name)
    params = describe(cls, RUN_PARAMS)
    for p in params:
        assert p.description, f"{name}.{p.name} has no description"
        assert validate_params(cls, {p.name: p.default}, owner=name, exclude=RUN_PARAMS) == {p.name: p.default}
    with pytest.raises(ParamsError, match=f"policy '{name}': no_such_parameter: Extra inputs are not permitted"):
        make_policy(name, {"no_such_parameter": 1})
