"""Small builders of ClusterViews and requests for the policy tests."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from lodestar.cluster_view import ClusterView, RequestInfo


def cluster(
    n: int,
    *,
    gpu_types: Sequence[str] | None = None,
    running: Sequence[float] | None = None,
    waiting: Sequence[float] | None = None,
    inflight: Sequence[float] | None = None,
    pending_prefill_tokens: Sequence[float] | None = None,
    kv_usage: Sequence[float] | None = None,
    max_kv_tokens: Sequence[float] | None = None,
    matched: Sequence[float] | None = None,
    now_ms: float = 0.0,
) -> ClusterView:
    """A view over `n` workers w0..w{n-1}; every array not given is zero (GPU type A100)."""

    def arr(values: Sequence[float] | None) -> np.ndarray:
        return np.zeros(n) if values is None else np.array(values, dtype=np.float64)

    return ClusterView(
        worker_ids=[f"w{i}" for i in range(n)],
        gpu_types=list(gpu_types) if gpu_types is not None else ["A100"] * n,
        running=arr(running),
        waiting=arr(waiting),
        inflight=arr(inflight),
        pending_prefill_tokens=arr(pending_prefill_tokens),
        kv_usage=arr(kv_usage),
        max_kv_tokens=arr(max_kv_tokens),
        recent_ttft_ms=arr(None),
        matched_prefix_tokens=arr(matched),
        now_ms=now_ms,
    )


def request(prompt_tokens: int, tokens_per_block: int = 16, request_id: str = "r") -> RequestInfo:
    """A request whose block hashes are placeholders (one per whole block: the policies count them)."""
    n_blocks = prompt_tokens // tokens_per_block
    return RequestInfo(
        request_id=request_id,
        prompt_tokens=prompt_tokens,
        block_hashes=tuple(range(1, n_blocks + 1)),
        tokens_per_block=tokens_per_block,
    )
