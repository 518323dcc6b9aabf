"""The `learned` policy: analytic estimate from the first request, a learned model only where it has proven
better than the estimate, never an optimistic extrapolation below the estimate, no exploration."""

from __future__ import annotations

import numpy as np
import pytest
from policy_views import cluster, request

from dispatcher.policies.baselines.common import outstanding_requests
from dispatcher.policies.learned import LearnedPolicy
from dispatcher.policies.registry import follows_snapshots, make_policy
from lodestar.cluster_view import ClusterView
from lodestar.features import ESTIMATE_FEATURE, FEATURE_INDEX, N_FEATURES, candidate_matrix
from lodestar.snapshot import Snapshot, SnapshotError
from lodestar.ttft_estimate import estimate_ttft_ms, estimate_with_cost_terms_ms, own_prefill_ms
from lodestar.ttft_model import TTFTModel

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


def with_snapshot(snapshot: Snapshot, **kw: bool) -> LearnedPolicy:
    p = LearnedPolicy(**kw)
    p.load_snapshot(snapshot)
    return p


def test_registered_and_routes_by_the_estimate_from_the_first_request() -> None:
    p = make_policy("learned")
    assert follows_snapshots("learned") and isinstance(p, LearnedPolicy) and p.fallback_name() == "analytic"
    view = hetero_view()
    d = p.choose(REQ, view)
    est = estimate_ttft_ms(REQ, view)
    assert (d.worker_id, d.policy, d.model_version) == ("w1", "learned/analytic", 0)
    assert d.fallback and d.features is None  # no model: no candidate matrix either
    assert d.predicted_ttft_ms == pytest.approx(est[1])
    assert d.scores is not None and np.allclose(-d.scores, est)


def test_the_estimate_is_the_candidate_matrix_feature() -> None:
    view = hetero_view()
    assert np.allclose(candidate_matrix(REQ, view)[:, FEATURE_INDEX[ESTIMATE_FEATURE]], estimate_ttft_ms(REQ, view))


def test_a_busy_fast_worker_loses_to_an_idle_slower_one_when_the_estimate_says_so() -> None:
    # 40k tokens queued on the H100 take longer than the request alone on the A100.
    view = cluster(3, gpu_types=["L4", "H100", "A100"], pending_prefill_tokens=[0, 40_000, 0], waiting=[0, 10, 0],
                   max_kv_tokens=[25_000, 400_000, 400_000])
    assert LearnedPolicy().choose(REQ, view).worker_id == "w2"


def test_the_cost_adds_the_delay_the_prefill_imposes_on_the_requests_already_there() -> None:
    view = cluster(3, gpu_types=["H100", "A100", "L4"], running=[12, 3, 0], inflight=[14, 5, 1], waiting=[1, 0, 1],
                   pending_prefill_tokens=[900, 0, 300], matched=[0, 512, 0], kv_usage=[0.4, 0.7, 0.1],
                   max_kv_tokens=[400_000, 400_000, 25_000])
    p = LearnedPolicy(delay_outstanding=0.2, delay_queued=0.7, iteration_risk=0.0)
    d = p.choose(REQ, view)
    queued = np.maximum(view.inflight - view.running, view.waiting)
    delay = own_prefill_ms(REQ, view) * (0.2 * outstanding_requests(view) + 0.7 * queued)
    assert np.allclose(-d.scores, estimate_ttft_ms(REQ, view) + delay)
    assert d.predicted_ttft_ms == pytest.approx(estimate_ttft_ms(REQ, view)[d.index])  # a TTFT, not the cost
    zero = LearnedPolicy(delay_outstanding=0, delay_queued=0, iteration_risk=0.0).choose(REQ, view)
    assert np.allclose(-zero.scores, estimate_ttft_ms(REQ, view))
    # the iteration risk adds its share of the iteration in progress, and nothing to the predicted TTFT
    terms = estimate_with_cost_terms_ms(REQ, view)[1]
    assert terms is not None
    risky = LearnedPolicy(delay_outstanding=0.2, delay_queued=0.7, iteration_risk=1.5).choose(REQ, view)
    assert np.allclose(-risky.scores, estimate_ttft_ms(REQ, view) + delay + 0.75 * terms.iteration_ms)
    assert risky.predicted_ttft_ms == pytest.approx(estimate_ttft_ms(REQ, view)[risky.index])


def test_the_cost_counts_the_whole_iteration_in_progress() -> None:
    """Both workers hold the prompt. w1 decodes fewer requests but has an 800-token prefill queued: a request
    arriving there may wait all of a long prefill iteration. With the expected half of the iteration only
    (iteration_risk 0) w1 costs less; the default counts the whole iteration and takes w0."""
    view = cluster(2, gpu_types=["L40S", "L40S"], running=[32, 16], inflight=[32, 17], waiting=[0, 1],
                   pending_prefill_tokens=[0, 800], matched=[1600, 1600], kv_usage=[0.1, 0.05],
                   max_kv_tokens=[185_000] * 2)
    req = request(1700)
    terms = estimate_with_cost_terms_ms(req, view)[1]
    assert terms is not None and terms.iteration_ms[1] > terms.iteration_ms[0] > 0
    assert LearnedPolicy(iteration_risk=0.0).choose(req, view).worker_id == "w1"
    assert LearnedPolicy().choose(req, view).worker_id == "w0"


def test_a_long_prefill_avoids_stalling_many_decoding_requests() -> None:
    # w0 decodes 16 requests, w1 has one request queued: the request's TTFT is lower on w0, but its 2,000-token
    # prefill would stall 16 requests there; the default cost sends it to w1, the TTFT alone to w0.
    view = cluster(2, running=[16, 0], inflight=[16, 1], waiting=[0, 1], pending_prefill_tokens=[0, 1500],
                   max_kv_tokens=[400_000] * 2)
    est = estimate_ttft_ms(REQ, view)
    assert est[0] < est[1]
    assert LearnedPolicy().choose(REQ, view).worker_id == "w1"
    assert LearnedPolicy(delay_outstanding=0, delay_queued=0).choose(REQ, view).worker_id == "w0"
    # A cached request's prefill is short: it goes where its TTFT is least.
    hit = cluster(2, running=[16, 0], inflight=[16, 1], waiting=[0, 1], pending_prefill_tokens=[0, 1500],
                  matched=[1984, 0], max_kv_tokens=[400_000] * 2)
    assert LearnedPolicy().choose(REQ, hit).worker_id == "w0"


def test_a_cached_prefix_wins_on_equal_gpus() -> None:
    view = cluster(3, matched=[0, 1984, 0], max_kv_tokens=[400_000] * 3)
    assert LearnedPolicy().choose(REQ, view).worker_id == "w1"


def test_validated_model_decides() -> None:
    # a model that (wrongly, but validated) prefers the slow GPU: it is obeyed
    p = with_snapshot(feature_snapshot("gpu_speed", 100.0))
    d = p.choose(REQ, hetero_view())
    assert (d.worker_id, d.policy, d.model_version) == ("w0", "learned", 3)


def test_unvalidated_model_is_ignored() -> None:
    p = with_snapshot(feature_snapshot("gpu_speed", 100.0, validated=False))
    assert p.choose(REQ, hetero_view()).policy == "learned/analytic"
    p = with_snapshot(feature_snapshot("gpu_speed", 100.0, validated=False), require_validated=False)
    assert p.choose(REQ, hetero_view()).policy == "learned"


def test_extrapolation_never_goes_below_the_estimate() -> None:
    """A model trained on gpu_speed in [0, 1.5] sees the H100 (3.17) outside that range: there it may not
    claim less than the estimate, so its optimistic 1 ms guess cannot win over the L4 it was trained on."""
    snap = feature_snapshot("gpu_speed", -0.0001, hi=1.5)  # predicts ~1 ms everywhere, H100 out of range
    view = hetero_view()
    est = estimate_ttft_ms(REQ, view)
    pred, _, learned, _ = with_snapshot(snap).predict(REQ, view)
    assert learned
    assert pred[1] == pytest.approx(est[1])  # the estimate, not the model's 1 ms
    assert pred[0] == pytest.approx(1.0 - 0.0001 * (121 / 312))  # in range: the model
    unchecked, _, _, _ = with_snapshot(snap, check_range=False).predict(REQ, view)
    assert unchecked[1] < 2.0


def test_a_snapshot_it_cannot_evaluate_is_refused_and_the_old_model_kept() -> None:
    p = with_snapshot(feature_snapshot("gpu_speed", 100.0, version=4))
    bad = Snapshot(9, "tree", "tree", ("gpu_speed",), {}, {})
    with pytest.raises(SnapshotError, match="kind"):
        p.load_snapshot(bad)
    assert p.model_version == 4


def test_ties_are_broken_at_random_not_always_first() -> None:
    p = LearnedPolicy(worker_correction=False)
    view = ClusterView.empty_like(["a", "b", "c", "d"], ["H100"] * 4)
    chosen = {p.choose(REQ, view).worker_id for _ in range(100)}
    assert chosen == {"a", "b", "c", "d"}


def test_same_seed_same_decisions() -> None:
    def run() -> list[int]:
        p = LearnedPolicy(seed=7)
        return [p.choose(REQ, ClusterView.empty_like(["a", "b", "c"], ["A100"] * 3)).index for _ in range(50)]

    assert run() == run()


def test_a_model_of_the_full_matrix_hands_the_chosen_row_to_the_caller() -> None:
    view = hetero_view()
    d = with_snapshot(feature_snapshot("uncached_per_speed", 1.0)).choose(REQ, view)
    assert d.policy == "learned" and not d.fallback
    assert d.features is not None and np.allclose(d.features, candidate_matrix(REQ, view)[d.index])


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


def gpu_snapshot(hi: float = 1e9) -> Snapshot:
    """A log1p residual over the estimate of the GPU figures (the default ridge's shape), trained on gpu_speed
    up to `hi`."""
    return Snapshot(
        version=5, family="ridge_residual", kind="dense", feature_names=("gpu_speed", "gpu_mem_bw"),
        arrays={"x_center": np.array([1.0, 1.0]), "x_inv_scale": np.array([2.0, 0.5]),
                "layer0_w": np.array([[0.3], [-0.2]]), "layer0_b": np.array([0.0]),
                "feature_min": np.array([0.0, 0.0]), "feature_max": np.array([hi, 1e9])},
        meta={"layers": 1, "log1p_features": [], "range_margin": 0.0, "validated": True,
              "target": {"transform": "log1p", "center": 0.1, "scale": 1.0, "base_feature": ESTIMATE_FEATURE}},
    )


@pytest.mark.parametrize("hi", [1e9, 1.5])
def test_a_model_of_the_gpu_figures_predicts_what_the_model_says_on_the_full_matrix(hi: float) -> None:
    """Its own term is kept per worker set: the predictions equal the model's on the candidate matrix to the
    bit, including after the worker set changes (a new list, or the same list changed in place)."""
    snap = gpu_snapshot(hi)
    p = with_snapshot(snap)
    model = TTFTModel(snap)
    view = hetero_view()
    for v in (view, view.with_matched(np.array([0.0, 1024.0, 512.0])),
              cluster(4, gpu_types=["A10G", "H100", "L4", "H100"], pending_prefill_tokens=[0, 900, 0, 20],
                      max_kv_tokens=[25_000] * 4)):
        x = candidate_matrix(REQ, v)
        expected = model.predict(x)
        if hi < 1e9:  # H100s are outside the range: there never below the estimate
            outside = model.out_of_range(x)
            assert outside.any()
            expected = np.where(outside, np.maximum(expected, x[:, FEATURE_INDEX[ESTIMATE_FEATURE]]), expected)
        pred, full, learned, _ = p.predict(REQ, v)
        assert learned and full is None and np.array_equal(pred, expected)
    view.gpu_types[0] = "H100"  # changed in place: the kept terms must not be reused
    view.gpu_speed[0] = view.gpu_speed[1]
    view.max_kv_tokens[0] = view.max_kv_tokens[1]
    pred = p.predict(REQ, view)[0]
    assert pred[0] == pred[1]  # two identical idle H100s now
