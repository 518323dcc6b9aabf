"""The `learned` policy: least predicted TTFT, decaying exploration, heuristic fallback."""

from __future__ import annotations

import numpy as np
import pytest

from dispatcher.policies.learned import LearnedPolicy
from dispatcher.policies.registry import make_policy
from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.features import FEATURE_INDEX, N_FEATURES, candidate_matrix
from lodestar.params import ParamsError
from lodestar.snapshot import Snapshot, SnapshotError
from lodestar.ttft_model import TTFTModel

REQ = RequestInfo("r", prompt_tokens=2000)


class AlwaysLast:
    """A stand-in heuristic that is easy to recognise."""

    name = "always_last"

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        i = view.size - 1
        return Decision(index=i, worker_id=view.worker_ids[i], policy=self.name)


def linear_snapshot(weight: float = 1.0, validated: bool = True, version: int = 4,
                    lo: float = 0.0, hi: float = 1e6) -> Snapshot:
    """TTFT(ms) = 1 + weight * uncached_per_speed, trained on uncached_per_speed in [lo, hi]."""
    return Snapshot(
        version=version,
        family="river",
        kind="dense",
        feature_names=("uncached_per_speed",),
        arrays={
            "x_center": np.zeros(1), "x_inv_scale": np.ones(1),
            "layer0_w": np.array([[weight]]), "layer0_b": np.array([1.0]),
            "feature_min": np.array([lo]), "feature_max": np.array([hi]),
        },
        meta={"layers": 1, "log1p_features": [], "range_margin": 0.1, "validated": validated,
              "target": {"transform": "identity", "center": 0.0, "scale": 1.0}},
    )


def hetero_view() -> ClusterView:
    # w0 is an L4 (slow), w1 an H100 (fast), w2 an A100; all idle, no cached prefix.
    return ClusterView.empty_like(["w0", "w1", "w2"], ["L4", "H100", "A100"])


def learned(snapshot: Snapshot | None = None, **kw) -> LearnedPolicy:
    """A learned policy falling back to AlwaysLast, with `snapshot` loaded."""
    p = LearnedPolicy(fallback=AlwaysLast(), **kw)
    if snapshot is not None:
        p.load_snapshot(snapshot)
    return p


def policy(snapshot: Snapshot | None = None, **kw) -> LearnedPolicy:
    """The same, without exploration."""
    return learned(snapshot, **{"epsilon_start": 0.0, "epsilon_min": 0.0, **kw})


def test_prefers_the_instance_the_model_says_is_fastest() -> None:
    p = policy(snapshot=linear_snapshot())
    d = p.choose(REQ, hetero_view())
    assert (d.worker_id, d.policy, d.explored, d.model_version, d.fallback) == ("w1", "learned", False, 4, False)
    assert d.predicted_ttft_ms == pytest.approx(1.0 + 2000 / (989 / 312))
    assert d.scores is not None and d.scores.shape == (3,) and d.scores.argmax() == d.index  # higher preferred
    np.testing.assert_array_equal(d.features, candidate_matrix(REQ, hetero_view())[d.index])


def test_hot_swap_changes_the_choice() -> None:
    p = policy(snapshot=linear_snapshot())
    p.load_snapshot(linear_snapshot(weight=-1e-4, version=5))  # a model that (wrongly) likes slow GPUs
    d = p.choose(REQ, hetero_view())
    assert (d.worker_id, d.model_version) == ("w0", 5)


def test_cold_start_uses_the_fallback() -> None:
    d = policy().choose(REQ, hetero_view())
    assert (d.worker_id, d.policy, d.model_version, d.predicted_ttft_ms) == ("w2", "learned/always_last", 0, None)
    assert d.fallback and d.features is None  # no model: no candidate matrix either


def test_unvalidated_snapshot_uses_the_fallback() -> None:
    d = policy(snapshot=linear_snapshot(validated=False)).choose(REQ, hetero_view())
    assert d.policy == "learned/always_last" and d.model_version == 4
    d = policy(snapshot=linear_snapshot(validated=False), require_validated=False).choose(REQ, hetero_view())
    assert d.policy == "learned"


def test_out_of_range_pick_uses_the_fallback() -> None:
    # trained on uncached_per_speed in [0, 500]; margin 10% -> up to 550. The H100 pick sees 2000/3.17.
    p = policy(snapshot=linear_snapshot(hi=500.0))
    d = p.choose(REQ, hetero_view())
    assert d.policy == "learned/always_last" and d.fallback
    # the matrix the model looked at comes along with the fallback's pick
    np.testing.assert_array_equal(d.features, candidate_matrix(REQ, hetero_view())[d.index])
    assert p.choose(RequestInfo("small", prompt_tokens=300), hetero_view()).policy == "learned"
    p = policy(snapshot=linear_snapshot(hi=500.0), check_range=False)
    assert p.choose(REQ, hetero_view()).policy == "learned"


def test_out_of_range_candidates_that_are_not_picked_do_not_matter() -> None:
    # up to 1100 allowed: the H100 (631) is in range, the L4 (5157) and A100 (2000) are not.
    d = policy(snapshot=linear_snapshot(hi=1000.0)).choose(REQ, hetero_view())
    assert (d.policy, d.worker_id) == ("learned", "w1")


def test_a_snapshot_it_cannot_evaluate_is_refused_and_the_old_model_kept() -> None:
    p = policy(snapshot=linear_snapshot())
    bad = Snapshot(9, "tree", "tree", ("uncached_per_speed",), {}, {})
    with pytest.raises(SnapshotError, match="kind"):
        p.load_snapshot(bad)
    assert p.model_version == 4


def test_exploration_decays_and_flags_decisions() -> None:
    p = learned(linear_snapshot(), epsilon_start=0.5, epsilon_min=0.01,
                      epsilon_half_life=500, explore_within=100.0, seed=1)
    assert p.epsilon == pytest.approx(0.5)
    decisions = [p.choose(REQ, hetero_view()) for _ in range(4000)]
    assert p.epsilon == pytest.approx(0.01 + 0.49 * 0.5**8)
    early = sum(d.explored for d in decisions[:500]) / 500
    late = sum(d.explored for d in decisions[-1000:]) / 1000
    assert early > 0.25 and late < 0.05
    # an explored decision goes elsewhere than the greedy choice; an unexplored one does not
    assert all((d.worker_id != "w1") == d.explored for d in decisions)
    assert {d.worker_id for d in decisions if d.explored} == {"w0", "w2"}


def test_exploration_stays_near_the_best_prediction() -> None:
    # predictions: H100 ~632 ms, A100 2001 ms, L4 ~5157 ms; within 4x of the best only the A100 qualifies
    p = learned(linear_snapshot(), epsilon_start=1.0, epsilon_min=1.0,
                      explore_within=4.0, seed=2)
    assert {p.choose(REQ, hetero_view()).worker_id for _ in range(200)} == {"w2"}
    p = learned(linear_snapshot(), epsilon_start=1.0, epsilon_min=1.0,
                      explore_within=1.5, seed=2)
    d = p.choose(REQ, hetero_view())
    assert (d.worker_id, d.explored) == ("w1", False)  # nothing close enough: no exploration


def test_the_fallback_does_not_explore() -> None:
    p = learned(epsilon_start=1.0, epsilon_min=1.0, seed=3)
    assert all(not p.choose(REQ, hetero_view()).explored for _ in range(50))


def test_same_seed_same_decisions() -> None:
    def run() -> list[int]:
        p = learned(linear_snapshot(), epsilon_start=0.3,
                          explore_within=10.0, seed=7)
        return [p.choose(REQ, hetero_view()).index for _ in range(200)]

    assert run() == run()


def test_ties_are_broken_at_random_not_always_first() -> None:
    p = policy(snapshot=linear_snapshot())
    view = ClusterView.empty_like(["a", "b", "c", "d"], ["H100"] * 4)
    chosen = {p.choose(REQ, view).worker_id for _ in range(100)}
    assert chosen == {"a", "b", "c", "d"}


def test_invalid_epsilon_settings() -> None:
    with pytest.raises(ParamsError, match="epsilon_min <= epsilon_start"):
        make_policy("learned", {"fallback": AlwaysLast(), "epsilon_start": 0.1, "epsilon_min": 0.2})
    with pytest.raises(ParamsError, match="explore_within: Input should be greater than or equal to 1"):
        make_policy("learned", {"fallback": AlwaysLast(), "explore_within": 0.5})


def test_range_is_checked_in_the_models_log_space() -> None:
    # inflight seen in [0, 20], through log1p: margin 0.25 of the log span allows up to ~43.97 in flight
    snap = Snapshot(
        version=1, family="mlp", kind="dense", feature_names=("inflight",),
        arrays={"x_center": np.zeros(1), "x_inv_scale": np.ones(1), "layer0_w": np.ones((1, 1)),
                "layer0_b": np.zeros(1), "feature_min": np.zeros(1), "feature_max": np.array([20.0])},
        meta={"layers": 1, "log1p_features": ["inflight"], "range_margin": 0.25, "validated": True,
              "target": {"transform": "log1p", "center": 0.0, "scale": 1.0}},
    )
    model = TTFTModel(snap)
    x = np.zeros((3, N_FEATURES))
    x[:, FEATURE_INDEX["inflight"]] = [0.0, 43.0, 45.0]
    assert model.out_of_range(x).tolist() == [False, False, True]
    np.testing.assert_allclose(model.predict(x), x[:, FEATURE_INDEX["inflight"]])  # expm1(log1p(v)) = v
