"""SGLang router `cache_aware`: prefix affinity while the cluster is balanced, shortest queue otherwise."""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import Field

from dispatcher.policies.baselines.common import decide, outstanding_requests, require_workers
from lodestar.cluster_view import ClusterView, Decision, RequestInfo


class SGLangCacheAware:
    """SGLang router `cache_aware`: the longest prefix match while load is balanced, else the least loaded.

    SGLang's cache-aware load balancing (approximate-tree mode), in this order:

    1. Imbalance check over all workers' loads: if `max - min > balance_abs_threshold` and
       `max > balance_rel_threshold * min`, route to the minimum-load worker (the first one).
    2. Otherwise match rate = longest matched prefix (over all workers) / prompt tokens. If it is
       strictly greater than `cache_threshold`, route to the worker holding that longest match.
    3. Otherwise route to the minimum-load worker (the first one).

    Sources: lightseekorg/smg model_gateway/src/policies/cache_aware.rs (`select_worker`,
    `select_worker_with_tokens`, `select_worker_min_load`; formerly sgl-project/sglang
    sgl-router/src/policies/cache_aware.rs). Defaults are the router's command-line defaults in
    sgl-project/sglang sgl-router/py_src/sglang_router/router_args.py: cache_threshold 0.3,
    balance_abs_threshold 64, balance_rel_threshold 1.5 (the Rust `CacheAwareConfig::default()` has
    0.5 / 32 / 1.1, used only when the Rust API is called without arguments).

    Here: load = `outstanding_requests` (SGLang's `worker.load()`, the router's in-flight count); the
    radix tree is the router-side prefix index whose matches arrive in `view.matched_prefix_tokens`
    (the caller inserts the request for the chosen worker afterwards, as SGLang inserts into its tree).
    SGLang returns any tenant of the deepest matched tree node; among workers sharing the longest match
    this picks the least loaded, then the first. Rust's `min_by_key` keeps the first minimum, so do we.
    Scores: matched prefix fraction when routing by cache, minus the load when routing by load.
    The rule is deterministic: `seed` is accepted only so that every baseline is built the same way.
    """

    name = "sglang_cache_aware"

    def __init__(
        self,
        cache_threshold: Annotated[float, Field(ge=0, le=1, description=(
            "route by cache when the longest match covers more than this fraction of the prompt"))] = 0.3,
        balance_abs_threshold: Annotated[float, Field(ge=0, description=(
            "the cluster is imbalanced (route to the least loaded) when max - min load exceeds this and "
            "max load exceeds balance_rel_threshold x min load"))] = 64,
        balance_rel_threshold: Annotated[float, Field(ge=0, description=(
            "the relative part of the imbalance test (see balance_abs_threshold)"))] = 1.5,
        seed: int = 0,
    ):
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """Apply the imbalance check, then the cache match, then the min-load fallback."""
        require_workers(view)
        load = outstanding_requests(view)
        lo, hi = float(load.min()), float(load.max())
        imbalanced = hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold
        if not imbalanced and request.prompt_tokens > 0:
            matched = view.matched_prefix_tokens
            best = float(matched.max())
            if best / request.prompt_tokens > self.cache_threshold:
                holders = np.flatnonzero(matched == best)
                i = int(holders[np.argmin(load[holders])])
                return decide(self.name, view, i, matched / request.prompt_tokens)
        return decide(self.name, view, int(np.argmin(load)), -load)
