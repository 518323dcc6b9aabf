"""The one feature definition: ordered names and the candidate matrix for a request.

Used by the dispatcher (live routing), the learner (training) and the simulator, so a model trained
on telemetry sees exactly what the router computed when it decided. Every feature is computable from
what a router knows: the request's prompt length, the router-side prefix index (matched tokens on each
worker) and each worker's published live state (Redis hash / simulator view) plus its GPU type.

The raw quantities follow the paper's list (input tokens, expected prefix hit on that instance,
running and waiting requests, in-flight work, pending prefill tokens, KV usage, GPU model); the
derived ones divide work by the GPU's speed so that TTFT is close to linear in them: the time to
prefill this request's uncached tokens, the time to drain the prefill backlog ahead of it, the queue
depth per unit of speed; and the KV pressure (prefill backlog plus this request over the free KV
tokens: past 1, the request waits for running sequences to finish), which cut the learned policy's
distance to the oracle by about a third in offline counterfactual tests (docs/learning.md); and the
analytic TTFT estimate of the calibrated engine model (lodestar/ttft_estimate.py). GPU model
enters as its public compute and memory-bandwidth figures relative to an A100 (unique per known type,
and meaningful for a type never seen in training).
"""

from __future__ import annotations

import numpy as np

from lodestar.cluster_view import ClusterView, Decision, GpuSetMemo, RequestInfo
from lodestar.hardware import GPUS, REFERENCE_GPU, gpu
from lodestar.ttft_estimate import CostTerms, cached_tokens, estimate_with_cost_terms_ms

FEATURE_NAMES: tuple[str, ...] = (
    "prompt_tokens",
    "matched_prefix_tokens",
    "uncached_tokens",
    "prefix_hit_ratio",
    "running",
    "waiting",
    "inflight",
    "pending_prefill_tokens",
    "kv_usage",
    "gpu_speed",
    "gpu_mem_bw",
    "recent_ttft_ms",
    "uncached_per_speed",
    "backlog_tokens_per_speed",
    "queue_per_speed",
    "running_per_mem_bw",
    "kv_free_tokens",
    "kv_pressure",
    "ttft_estimate_ms",
)
N_FEATURES = len(FEATURE_NAMES)
# The calibrated engine model's analytic TTFT: what the learned policy routes with until a model beats it.
ESTIMATE_FEATURE = "ttft_estimate_ms"
FEATURE_INDEX: dict[str, int] = {name: i for i, name in enumerate(FEATURE_NAMES)}

# Counts, token amounts and latencies: non-negative and heavy-tailed, so models see them as log1p.
HEAVY_TAILED: tuple[str, ...] = (
    "prompt_tokens",
    "matched_prefix_tokens",
    "uncached_tokens",
    "running",
    "waiting",
    "inflight",
    "pending_prefill_tokens",
    "recent_ttft_ms",
    "uncached_per_speed",
    "backlog_tokens_per_speed",
    "queue_per_speed",
    "running_per_mem_bw",
    "kv_free_tokens",
    "kv_pressure",
    "ttft_estimate_ms",
)


def _relative_mem_bw(gpu_types: tuple[str, ...], _speed: np.ndarray) -> np.ndarray:
    """Memory bandwidth relative to the reference GPU; unknown types count as 1.0."""
    ref = GPUS[REFERENCE_GPU].mem_bw_gbs
    out = np.ones(len(gpu_types), dtype=np.float64)
    for i, name in enumerate(gpu_types):
        try:
            out[i] = gpu(name).mem_bw_gbs / ref
        except KeyError:
            continue
    out.setflags(write=False)
    return out


_mem_bw = GpuSetMemo(_relative_mem_bw)  # once per worker set, not per decision


def candidate_matrix(request: RequestInfo, view: ClusterView) -> np.ndarray:
    """Features of (request, worker i) for every worker at once: shape (n_workers, N_FEATURES)."""
    return candidate_matrix_with_cost_terms(request, view, terms=False)[0]


def candidate_matrix_with_cost_terms(request: RequestInfo, view: ClusterView, terms: bool = True
                                     ) -> tuple[np.ndarray, CostTerms | None]:
    """The candidate matrix and (with `terms`) the estimate's cost terms per worker (the request's own prefill
    time and the iteration in progress, lodestar.ttft_estimate.CostTerms), from the one pass that computes
    the estimate column."""
    n = view.size
    x = np.empty((n, N_FEATURES), dtype=np.float64)
    prompt = float(request.prompt_tokens)
    matched = cached_tokens(request, view)
    uncached = prompt - matched
    speed = np.maximum(view.gpu_speed, 1e-6)
    mem_bw = _mem_bw(view)
    queue = view.waiting + view.inflight
    x[:, 0] = prompt
    x[:, 1] = matched
    x[:, 2] = uncached
    x[:, 3] = matched / max(prompt, 1.0)
    x[:, 4] = view.running
    x[:, 5] = view.waiting
    x[:, 6] = view.inflight
    x[:, 7] = view.pending_prefill_tokens
    x[:, 8] = view.kv_usage
    estimate, cost_terms = estimate_with_cost_terms_ms(request, view, terms=terms, cached=matched)
    _fill_prior_columns(x, view.gpu_speed, mem_bw, estimate)
    x[:, 11] = view.recent_ttft_ms
    x[:, 12] = uncached / speed
    backlog = view.pending_prefill_tokens + uncached
    x[:, 13] = backlog / speed
    x[:, 14] = queue / speed
    x[:, 15] = view.running / mem_bw
    # KV headroom: once the prefill backlog plus this request outgrow the free KV cache, the request
    # waits for running sequences to finish, not just for prefill compute. Unknown capacity counts as 0.
    known = view.max_kv_tokens > 0
    free = np.where(known, (1.0 - np.minimum(np.maximum(view.kv_usage, 0.0), 1.0)) * view.max_kv_tokens, 0.0)
    x[:, 16] = free
    x[:, 17] = np.where(known, backlog / np.maximum(free, 1.0), 0.0)
    return x, cost_terms


# The features of a worker's GPU alone: constant while the worker set is. A model that reads only these (and
# perhaps the estimate as its base) is evaluated once per worker set, not per decision (the learned policy).
GPU_FEATURES: tuple[str, ...] = ("gpu_speed", "gpu_mem_bw")
# The features a router has without per-request work beyond the analytic estimate: the GPU type's figures
# and the estimate itself. A model that reads only these is evaluated on `prior_matrix`, which skips the
# rest of the candidate matrix (the learned policy's decision cost).
PRIOR_FEATURES: tuple[str, ...] = (*GPU_FEATURES, ESTIMATE_FEATURE)


def _fill_prior_columns(x: np.ndarray, gpu_speed: np.ndarray, mem_bw: np.ndarray, estimate: np.ndarray | None) -> None:
    x[:, FEATURE_INDEX["gpu_speed"]] = gpu_speed
    x[:, FEATURE_INDEX["gpu_mem_bw"]] = mem_bw
    # The calibrated engine model's analytic TTFT on this worker (lodestar.ttft_estimate): a prior that is
    # right from the first request, which a model can learn a correction of.
    if estimate is not None:
        x[:, FEATURE_INDEX[ESTIMATE_FEATURE]] = estimate


def prior_matrix(view: ClusterView, estimate: np.ndarray) -> np.ndarray:
    """A candidate matrix with only PRIOR_FEATURES filled in (the other columns are zero)."""
    x = np.zeros((view.size, N_FEATURES), dtype=np.float64)
    _fill_prior_columns(x, view.gpu_speed, _mem_bw(view), estimate)
    return x


def gpu_matrix(gpu_types: tuple[str, ...], gpu_speed: np.ndarray) -> np.ndarray:
    """A candidate matrix of these workers with only GPU_FEATURES filled in (the other columns are zero)."""
    x = np.zeros((len(gpu_types), N_FEATURES), dtype=np.float64)
    _fill_prior_columns(x, gpu_speed, _relative_mem_bw(gpu_types, gpu_speed), None)
    return x


def chosen_features(request: RequestInfo, view: ClusterView, decision: Decision) -> np.ndarray:
    """The chosen candidate's feature row: the one the policy computed if it did, else computed now for that
    candidate alone (each row reads only its own worker), so a decision never pays for a second full matrix."""
    if decision.features is not None:
        return decision.features
    return candidate_matrix(request, view.take(decision.index))[0]


def as_dict(row: np.ndarray) -> dict[str, float]:
    """One candidate's feature row as a named mapping (what a RoutingDecision carries)."""
    values = row.tolist()  # Python floats in one call, not a numpy scalar per feature
    if len(values) != N_FEATURES:
        raise ValueError(f"a feature row has {N_FEATURES} values, not {len(values)}")
    return dict(zip(FEATURE_NAMES, values, strict=True))


def from_dict(features: dict[str, float]) -> np.ndarray:
    """A named mapping back to a row in FEATURE_NAMES order; missing names raise KeyError."""
    missing = [n for n in FEATURE_NAMES if n not in features]
    if missing:
        raise KeyError(f"features missing: {', '.join(missing)}")
    return np.array([features[n] for n in FEATURE_NAMES], dtype=np.float64)


def column_indices(names: tuple[str, ...] | list[str]) -> np.ndarray:
    """Positions of `names` in FEATURE_NAMES (a model trained on a subset picks its columns)."""
    unknown = [n for n in names if n not in FEATURE_INDEX]
    if unknown:
        raise KeyError(f"unknown features: {', '.join(unknown)}")
    return np.array([FEATURE_INDEX[n] for n in names], dtype=np.intp)
