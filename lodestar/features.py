"""The one feature definition: ordered names and the candidate matrix for a request.

Used by the dispatcher (live routing), the learner (training) and the simulator, so a model trained
on telemetry sees exactly what the router computed when it decided.
"""

from __future__ import annotations

import numpy as np

from lodestar.cluster_view import ClusterView, RequestInfo

FEATURE_NAMES: tuple[str, ...] = (
    "prompt_tokens",
    "matched_prefix_tokens",
    "uncached_tokens",
    "running",
    "waiting",
    "inflight",
    "pending_prefill_tokens",
    "kv_usage",
    "gpu_speed",
    "recent_ttft_ms",
    "uncached_per_speed",
    "backlog_tokens_per_speed",
    "queue_per_speed",
)
N_FEATURES = len(FEATURE_NAMES)


def candidate_matrix(request: RequestInfo, view: ClusterView) -> np.ndarray:
    """Features of (request, worker i) for every worker at once: shape (n_workers, N_FEATURES)."""
    n = view.size
    x = np.empty((n, N_FEATURES), dtype=np.float64)
    prompt = float(request.prompt_tokens)
    matched = np.minimum(view.matched_prefix_tokens, max(prompt - 1.0, 0.0))
    uncached = prompt - matched
    speed = np.maximum(view.gpu_speed, 1e-6)
    x[:, 0] = prompt
    x[:, 1] = matched
    x[:, 2] = uncached
    x[:, 3] = view.running
    x[:, 4] = view.waiting
    x[:, 5] = view.inflight
    x[:, 6] = view.pending_prefill_tokens
    x[:, 7] = view.kv_usage
    x[:, 8] = view.gpu_speed
    x[:, 9] = view.recent_ttft_ms
    x[:, 10] = uncached / speed
    x[:, 11] = (view.pending_prefill_tokens + uncached) / speed
    x[:, 12] = (view.waiting + view.inflight) / speed
    return x


def as_dict(row: np.ndarray) -> dict[str, float]:
    """One candidate's feature row as a named mapping (what a RoutingDecision carries)."""
    return {name: float(v) for name, v in zip(FEATURE_NAMES, row, strict=True)}


def from_dict(features: dict[str, float]) -> np.ndarray:
    """A named mapping back to a row in FEATURE_NAMES order; missing names raise KeyError."""
    missing = [n for n in FEATURE_NAMES if n not in features]
    if missing:
        raise KeyError(f"features missing: {', '.join(missing)}")
    return np.array([features[n] for n in FEATURE_NAMES], dtype=np.float64)
