"""The `learned_prior` policy: analytic estimate from the first request, a learned model only where it has
proven better than the estimate, and never an optimistic extrapolation below the estimate."""

from __future__ import annotations

import numpy as np
import pytest
from policy_views import cluster, request

from dispatcher.policies import make_policy
from dispatcher.policies.learned_prior import PRIOR, LearnedPriorPolicy
from lodestar.cluster_view import ClusterView
from lodestar.features import candidate_matrix
from lodestar.snapshot import Snapshot
from lodestar.ttft_estimate import estimate_ttft_ms

REQ = request(2000)


def hetero_view() -> ClusterView:
    # w0 an L4 (slow), w1 an H100 (fast), w2 an A100; idle, nothing cached.
    return cluster(3, gpu_types=["L4", "H100", "A100"], max_kv_tokens=[25_000, 400_000, 400_000])


def feature_snapshot(feature: str, weight: float, *, validated: bool = True, lo: float = 0.0, hi: float = 1e9,
                     version: int = 3) -> Snapshot:
    """TTFT(ms) = 1 + weight * feature, trained on the feature in [lo, hi]."""
    return Snapshot(
        version=version, family="river", kind="dense", feature_names=(feature,),
        arrays={"x_center": np.zeros(1), "x_inv_scale": np.ones(1), "layer0_w": np.array([[weight]]),
                "layer0_b": np.array([1.0]), "feature_min": np.array([lo]), "feature_max": np.array([hi])},
        meta={"layers": 1, "log1p_features": [], "range_margin": 0.0, "validated": validated,
              "target": {"transform": "identity", "center": 0.0, "scale": 1.0}},
    )


def test_registered_and_routes_by_the_estimate_from_the_first_request() -> None:
    p = make_policy("learned_prior")
    view = hetero_view()
    d = p.choose(REQ, view)
    est = estimate_ttft_ms(REQ, view)
    assert (d.worker_id, d.policy, d.model_version) == ("w1", "learned_prior/prior", 0)
    assert d.predicted_ttft_ms == pytest.approx(est[1])
    assert d.scores is not None and np.allclose(-d.scores, est)


def test_the_estimate_is_the_candidate_matrix_feature() -> None:
    view = hetero_view()
    assert np.allclose(candidate_matrix(REQ, view)[:, 18], estimate_ttft_ms(REQ, view))
    assert PRIOR == "ttft_estimate_ms"


def test_a_busy_fast_worker_loses_to_an_idle_slower_one_when_the_estimate_says_so() -> None:
    # 40k tokens queued on the H100 take longer than the request alone on the A100.
    view = cluster(3, gpu_types=["L4", "H100", "A100"], pending_prefill_tokens=[0, 40_000, 0], waiting=[0, 10, 0],
                   max_kv_tokens=[25_000, 400_000, 400_000])
    assert LearnedPriorPolicy().choose(REQ, view).worker_id == "w2"


def test_a_cached_prefix_wins_on_equal_gpus() -> None:
    view = cluster(3, matched=[0, 1984, 0], max_kv_tokens=[400_000] * 3)
    assert LearnedPriorPolicy().choose(REQ, view).worker_id == "w1"


def test_validated_model_decides() -> None:
    # a model that (wrongly, but validated) prefers the slow GPU: it is obeyed
    p = LearnedPriorPolicy(snapshot=feature_snapshot("gpu_speed", 100.0))
    d = p.choose(REQ, hetero_view())
    assert (d.worker_id, d.policy, d.model_version) == ("w0", "learned_prior", 3)


def test_unvalidated_model_is_ignored() -> None:
    p = LearnedPriorPolicy(snapshot=feature_snapshot("gpu_speed", 100.0, validated=False))
    assert p.choose(REQ, hetero_view()).policy == "learned_prior/prior"
    p = LearnedPriorPolicy(snapshot=feature_snapshot("gpu_speed", 100.0, validated=False), require_validated=False)
    assert p.choose(REQ, hetero_view()).policy == "learned_prior"


def test_extrapolation_never_goes_below_the_estimate() -> None:
    """A model trained on gpu_speed in [0, 1.5] sees the H100 (3.17) outside that range: there it may not
    claim less than the estimate, so its optimistic 1 ms guess cannot win over the L4 it was trained on."""
    snap = feature_snapshot("gpu_speed", -0.0001, hi=1.5)  # predicts ~1 ms everywhere, H100 out of range
    view = hetero_view()
    est = estimate_ttft_ms(REQ, view)
    pred, learned = LearnedPriorPolicy(snapshot=snap).predict(REQ, view)
    assert learned
    assert pred[1] == pytest.approx(est[1])  # the estimate, not the model's 1 ms
    assert pred[0] == pytest.approx(1.0 - 0.0001 * (121 / 312))  # in range: the model
    unchecked, _ = LearnedPriorPolicy(snapshot=snap, check_range=False).predict(REQ, view)
    assert unchecked[1] < 2.0
