"""The shared feature definition: shapes, physics-derived columns, and the named round trip."""

from __future__ import annotations

import numpy as np
import pytest

from lodestar.cluster_view import ClusterView, Decision, GpuSetMemo, RequestInfo
from lodestar.features import (
    FEATURE_INDEX,
    FEATURE_NAMES,
    HEAVY_TAILED,
    N_FEATURES,
    as_dict,
    candidate_matrix,
    candidate_matrix_with_cost_terms,
    chosen_features,
    column_indices,
    from_dict,
)
from lodestar.hardware import relative_speed
from lodestar.ttft_estimate import estimate_with_cost_terms_ms


def view() -> ClusterView:
    return ClusterView(
        worker_ids=["a", "b", "c"],
        gpu_types=["H100", "L4", "mystery"],
        running=np.array([4.0, 0.0, 1.0]),
        waiting=np.array([2.0, 0.0, 0.0]),
        inflight=np.array([1.0, 0.0, 3.0]),
        pending_prefill_tokens=np.array([3000.0, 0.0, 100.0]),
        kv_usage=np.array([0.5, 0.0, 0.9]),
        max_kv_tokens=np.array([1e6, 1e5, 1e5]),
        recent_ttft_ms=np.array([80.0, 0.0, 30.0]),
        matched_prefix_tokens=np.array([512.0, 0.0, 5000.0]),
    )


def col(x: np.ndarray, name: str) -> np.ndarray:
    return x[:, FEATURE_INDEX[name]]


def test_matrix_shape_and_prefix_accounting() -> None:
    x = candidate_matrix(RequestInfo("r", prompt_tokens=1000), view())
    assert x.shape == (3, N_FEATURES)
    # the match on c exceeds the prompt: capped at prompt - 1, as SGLang reports cached tokens
    np.testing.assert_array_equal(col(x, "matched_prefix_tokens"), [512.0, 0.0, 999.0])
    np.testing.assert_array_equal(col(x, "uncached_tokens"), [488.0, 1000.0, 1.0])
    np.testing.assert_allclose(col(x, "prefix_hit_ratio"), [0.512, 0.0, 0.999])


def test_speed_normalized_columns() -> None:
    x = candidate_matrix(RequestInfo("r", prompt_tokens=1000), view())
    speed = np.array([relative_speed("H100"), relative_speed("L4"), 1.0])
    np.testing.assert_allclose(col(x, "gpu_speed"), speed)
    np.testing.assert_allclose(col(x, "uncached_per_speed"), np.array([488.0, 1000.0, 1.0]) / speed)
    np.testing.assert_allclose(col(x, "backlog_tokens_per_speed"), np.array([3488.0, 1000.0, 101.0]) / speed)
    np.testing.assert_allclose(col(x, "queue_per_speed"), np.array([3.0, 0.0, 3.0]) / speed)
    bw = col(x, "gpu_mem_bw")
    assert bw[0] > 1.0 > bw[1] and bw[2] == 1.0  # H100 > A100 > L4; unknown counts as the reference
    np.testing.assert_allclose(col(x, "running_per_mem_bw"), np.array([4.0, 0.0, 1.0]) / bw)


def test_named_round_trip_and_missing_names() -> None:
    x = candidate_matrix(RequestInfo("r", prompt_tokens=10), view())
    row = x[1]
    np.testing.assert_array_equal(from_dict(as_dict(row)), row)
    d = as_dict(row)
    del d["kv_usage"]
    with pytest.raises(KeyError, match="kv_usage"):
        from_dict(d)


def test_column_indices_and_heavy_tailed_are_known_names() -> None:
    assert set(HEAVY_TAILED) <= set(FEATURE_NAMES)
    np.testing.assert_array_equal(column_indices(["gpu_speed", "prompt_tokens"]), [FEATURE_INDEX["gpu_speed"], 0])
    with pytest.raises(KeyError, match="nope"):
        column_indices(["nope"])


def test_kv_pressure_columns() -> None:
    x = candidate_matrix(RequestInfo("r", prompt_tokens=1000), view())
    # free = (1 - kv_usage) * max_kv_tokens; pressure = (pending prefill + uncached) / free
    np.testing.assert_allclose(col(x, "kv_free_tokens"), [5e5, 1e5, 1e4])
    np.testing.assert_allclose(col(x, "kv_pressure"), [3488.0 / 5e5, 1000.0 / 1e5, 101.0 / 1e4])
    unknown = view()
    unknown.max_kv_tokens = np.zeros(3)
    x = candidate_matrix(RequestInfo("r", prompt_tokens=1000), unknown)
    assert np.all(col(x, "kv_free_tokens") == 0.0) and np.all(col(x, "kv_pressure") == 0.0)


@pytest.mark.parametrize("prompt", [1, 600, 6000])
def test_the_chosen_row_alone_equals_its_row_of_the_full_matrix(prompt: int) -> None:
    """A decision without features gets its row computed for the chosen worker alone: the same numbers as
    that row of the whole candidate matrix (no feature reads another worker), at a fraction of the cost."""
    req = RequestInfo("r", prompt, max_new_tokens=200)
    v = view()
    full = candidate_matrix(req, v)
    for i in range(v.size):
        row = chosen_features(req, v, Decision(index=i, worker_id=v.worker_ids[i], policy="p"))
        np.testing.assert_allclose(row, full[i], rtol=1e-12)
    given = np.arange(N_FEATURES, dtype=np.float64)
    assert chosen_features(req, v, Decision(index=0, worker_id="a", policy="p", features=given)) is given


def test_the_matrix_with_the_cost_terms_is_the_matrix_and_the_estimates_cost_terms() -> None:
    """One pass for the full-feature model path: the same matrix and the same cost terms, to the bit."""
    req = RequestInfo("r", 4000, max_new_tokens=300)
    v = view()
    x, terms = candidate_matrix_with_cost_terms(req, v)
    assert np.array_equal(x, candidate_matrix(req, v))
    expected = estimate_with_cost_terms_ms(req, v)[1]
    assert terms is not None and expected is not None
    assert np.array_equal(terms.own_prefill_ms, expected.own_prefill_ms)
    assert np.array_equal(terms.iteration_ms, expected.iteration_ms)
    assert candidate_matrix_with_cost_terms(req, v, terms=False)[1] is None


def test_gpu_values_are_kept_per_worker_set_and_never_stale() -> None:
    """GpuSetMemo: built once while the view's GPUs stay the same (the same list, or an equal one), rebuilt
    when the list is changed in place or the speeds differ."""
    built: list[tuple[str, ...]] = []

    def build(types: tuple[str, ...], speed: np.ndarray) -> float:
        built.append(types)
        return float(speed.sum())

    memo = GpuSetMemo(build)
    v = view()
    assert memo(v) == memo(v.with_matched(np.zeros(3))) == memo(view()) == float(v.gpu_speed.sum())
    assert built == [("H100", "L4", "mystery")]
    v.gpu_types[1] = "H100"  # changed in place: the same list object, other contents
    v.gpu_speed = np.array([relative_speed(t) for t in v.gpu_types])
    assert memo(v) == pytest.approx(2 * relative_speed("H100") + relative_speed("mystery"))
    v.gpu_speed = v.gpu_speed * 2  # the same types at other speeds
    assert memo(v) == pytest.approx(2 * (2 * relative_speed("H100") + relative_speed("mystery")))
    assert len(built) == 3
