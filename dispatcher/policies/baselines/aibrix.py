"""AIBrix gateway routing: `prefix-cache` and `prefix-cache-preble` (prefix + load, Preble-style cost)."""

from __future__ import annotations

import math
import random
from collections import deque
from typing import Annotated

import numpy as np
from pydantic import Field

from dispatcher.policies.baselines.common import (
    argmin_random_tie,
    decide,
    matched_blocks,
    outstanding_requests,
    require_workers,
)
from lodestar.cluster_view import ClusterView, Decision, RequestInfo


def _least_loaded_if_imbalanced(load: np.ndarray, abs_count: float) -> list[int]:
    """AIBrix's imbalance filter: all workers, or only the minimum-load ones if max - min > abs_count."""
    lo, hi = float(load.min()), float(load.max())
    if hi - lo > abs_count:
        return [int(i) for i in np.flatnonzero(load == lo)]
    return list(range(len(load)))


class AIBrixPrefixCache:
    """AIBrix `prefix-cache`: the best prefix match among workers within a load bound, else least request.

    1. Imbalance: if max - min running requests > `imbalance_abs_count` (8), only the minimum-load
       workers remain candidates.
    2. Prefix match on the candidates: match percent = matched blocks * 100 // request blocks
       (integer, per worker, longest prefix). If some candidate matched at least one block: order the
       matched candidates by percent (high first), then load (low first), random among equals; take
       the first whose load <= mean + `std_factor` * std of all workers' loads (sample std, n - 1).
    3. Otherwise (no match, or every match over the load bound): the least-request worker among all
       workers, random among equals.

    Source: vllm-project/aibrix pkg/plugins/gateway/algorithms/prefix_cache.go (`routeOriginal`,
    `getTargetPodListOnLoadImbalance`, `getTargetPodFromMatchedPods`; defaults
    AIBRIX_PREFIX_CACHE_POD_RUNNING_REQUEST_IMBALANCE_ABS_COUNT = 8,
    AIBRIX_PREFIX_CACHE_STANDARD_DEVIATION_FACTOR = 1), pkg/utils/prefixcacheindexer/hash.go
    (`seqSearchPrefix`: percent = (i + 1) * 100 / len(hashes)), util.go (sample std), and
    least_request.go (`selectTargetPodWithLeastRequestCount`). Load = `outstanding_requests` (the
    gateway-tracked running requests). Scores: match percent for the eligible matched candidates and
    -inf elsewhere when routing by prefix; minus the load when falling back.
    """

    name = "aibrix_prefix_cache"

    def __init__(
        self,
        imbalance_abs_count: Annotated[float, Field(ge=0, description=(
            "when max - min running requests exceeds this, only the least-loaded workers are candidates"))] = 8,
        std_factor: Annotated[float, Field(ge=0, description=(
            "a prefix match is taken only on a worker with load <= mean + std_factor x std"))] = 1.0,
        seed: int = 0,
    ):
        self.imbalance_abs_count = imbalance_abs_count
        self.std_factor = std_factor
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """Imbalance filter, then best prefix match within the load bound, else least request."""
        require_workers(view)
        load = outstanding_requests(view)
        loads = load.tolist()
        candidates = _least_loaded_if_imbalanced(load, self.imbalance_abs_count)
        total_blocks = len(request.block_hashes) or request.prompt_tokens // max(request.tokens_per_block, 1)
        if total_blocks > 0:
            blocks = matched_blocks(view, request.tokens_per_block).tolist()
            matched = [i for i in candidates if blocks[i] > 0]
            if matched:
                percent = {i: int(min(blocks[i], total_blocks)) * 100 // total_blocks for i in matched}
                n = len(loads)
                mean = sum(loads) / n
                std = math.sqrt(sum((x - mean) ** 2 for x in loads) / (n - 1)) if n > 1 else 0.0
                bound = mean + self.std_factor * std
                self._rng.shuffle(matched)
                matched.sort(key=lambda i: (-percent[i], loads[i]))
                eligible = [i for i in matched if loads[i] <= bound]
                if eligible:
                    scores = np.full(view.size, -np.inf)
                    scores[eligible] = [percent[i] for i in eligible]
                    return decide(self.name, view, eligible[0], scores)
        i = argmin_random_tie(loads, self._rng)
        return decide(self.name, view, i, -load)


def _v100_linear_s(n: float) -> float:
    if n >= 384:
        return (0.27106428 * n + 10.52444263) / 1000.0
    if n >= 192:
        return (-295 + 3.125 * n - 6.4e-3 * n * n) / 1000.0
    return 55.0 / 1000.0


def _v100_attention_s(context: float, unique_kv: float) -> float:
    unique_kv = unique_kv or context
    if context <= 1024:
        t = 0.80
    else:
        t = 4.65e-4 * context + 0.398
        if unique_kv <= 1024 and unique_kv <= 32 * 256 * 2048:
            t /= 2
    return t / 1000.0


def _v100_attention_quadratic_s(n: float) -> float:
    return (-18.425 + 9.65e-3 * n + 5.4e-6 * n * n) / 1000.0 if n >= 4096 else 0.0


def preble_prefill_time_s(uncached_tokens: float, context_tokens: float) -> float:
    """AIBrix's Preble prefill-time model (Mistral-7B on V100, its default target GPU), in seconds."""
    base = _v100_linear_s(uncached_tokens) + _v100_attention_s(context_tokens, uncached_tokens)
    return (base + _v100_attention_quadratic_s(uncached_tokens)) / 0.9


class AIBrixPrefixLoad:
    """AIBrix `prefix-cache-preble`: exploit a long prefix match, else the least windowed prefill+decode cost.

    Prefix-cache-and-load, after Preble's E2 scheduler:

    1. Imbalance filter as in `prefix-cache` (max - min running requests > 8: minimum-load workers only).
    2. Match ratio = longest matched prefix over all workers / prompt tokens. If > 0.5 (exploit): among
       the candidates holding the longest matched prefix found on a candidate, the one with the fewest
       requests routed to it within the sliding window (random among equals).
    3. Otherwise (explore): the candidate with the lowest windowed cost, the first on a tie, where each
       request routed within the window adds to its worker
       miss_rate * prefill_time(uncached, prompt) + decoding_length * time_per_token,
       miss_rate = uncached / prompt, prefill_time = AIBrix's Mistral-7B/V100 profile.

    Source: vllm-project/aibrix pkg/plugins/gateway/algorithms/prefix_cache_preble.go (`Route`,
    `getPodLoad`, `getNodeCost`, `getPrefillCost`, the V100 timing functions; defaults
    AIBRIX_ROUTER_PREBLE_TARGET_GPU=V100, DECODING_LENGTH=45, SLIDING_WINDOW_PERIOD=3 min, threshold
    0.5, time per token 0.15 when no measurement exists — AIBrix never records one).
    Differences, because AIBrix's per-radix-node histogram has no equivalent in a per-worker block
    index: one record per routed request (its own "node": miss rate and prefill of its uncached part),
    charged to the worker it was routed to only (AIBrix charges a node to every pod holding it and
    divides its prefill by their number). The window is this policy's own state, updated on every
    choice (as AIBrix's `PostRouteUpdate`), timed by `view.now_ms`. Scores: minus the windowed request
    count (exploit) or minus the windowed cost (explore) for candidates, -inf for the others.
    """

    name = "aibrix_prefix_load"

    def __init__(
        self,
        imbalance_abs_count: Annotated[float, Field(ge=0, description=(
            "when max - min running requests exceeds this, only the least-loaded workers are candidates"))] = 8,
        match_threshold: Annotated[float, Field(ge=0, le=1, description=(
            "exploit the longest match when it covers more than this fraction of the prompt"))] = 0.5,
        window_s: Annotated[float, Field(gt=0, description="sliding window of routed requests, seconds")] = 180.0,
        decoding_length: Annotated[float, Field(ge=0, description="decode tokens charged per request")] = 45,
        time_per_token_s: Annotated[float, Field(ge=0, description="cost of one decode token")] = 0.15,
        seed: int = 0,
    ):
        self.imbalance_abs_count = imbalance_abs_count
        self.match_threshold = match_threshold
        self.window_ms = window_s * 1000.0
        self.decode_cost = decoding_length * time_per_token_s
        self._rng = random.Random(seed)
        self._window: deque[tuple[float, str, float]] = deque()
        self._count: dict[str, int] = {}
        self._cost: dict[str, float] = {}

    def _expire(self, now_ms: float) -> None:
        start = now_ms - self.window_ms
        while self._window and self._window[0][0] <= start:
            _, wid, cost = self._window.popleft()
            self._count[wid] -= 1
            if self._count[wid] == 0:
                del self._count[wid]
                del self._cost[wid]
            else:
                self._cost[wid] -= cost

    def _record(self, now_ms: float, worker_id: str, prompt: int, uncached: float) -> None:
        miss_rate = uncached / prompt if prompt > 0 else 1.0
        cost = miss_rate * preble_prefill_time_s(uncached, prompt) + self.decode_cost
        self._window.append((now_ms, worker_id, cost))
        self._count[worker_id] = self._count.get(worker_id, 0) + 1
        self._cost[worker_id] = self._cost.get(worker_id, 0.0) + cost

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """Exploit the longest match when it covers most of the prompt, else explore by windowed cost."""
        require_workers(view)
        self._expire(view.now_ms)
        load = outstanding_requests(view)
        candidates = _least_loaded_if_imbalanced(load, self.imbalance_abs_count)
        matched = view.matched_prefix_tokens
        scores = np.full(view.size, -np.inf)
        prompt = request.prompt_tokens
        ratio = float(matched.max()) / prompt if prompt > 0 else 0.0
        holding = [i for i in candidates if matched[i] > 0]
        if ratio > self.match_threshold and holding:
            longest = max(matched[i] for i in holding)
            holders = [i for i in holding if matched[i] == longest]
            counts = [float(self._count.get(view.worker_ids[i], 0)) for i in holders]
            i = holders[argmin_random_tie(counts, self._rng)]
            scores[holders] = [-c for c in counts]
        else:
            costs = [self._cost.get(view.worker_ids[j], 0.0) for j in candidates]
            i = candidates[int(np.argmin(costs))]
            scores[candidates] = [-c for c in costs]
        self._record(view.now_ms, view.worker_ids[i], prompt, max(prompt - float(matched[i]), 0.0))
        return decide(self.name, view, i, scores)
