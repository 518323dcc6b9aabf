"""Small builders of ClusterViews and requests for the policy tests."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

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


def random_views(seed: int, count: int) -> Iterator[tuple[RequestInfo, ClusterView]]:
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
