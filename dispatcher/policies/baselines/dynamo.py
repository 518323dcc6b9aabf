"""NVIDIA Dynamo KV router: overlap-credited prefill blocks plus active decode blocks, lowest cost wins."""

from __future__ import annotations

import math
import random
from typing import Annotated

import numpy as np
from pydantic import Field

from dispatcher.policies.baselines.common import argmin_random_tie, decide, require_workers
from lodestar.cluster_view import ClusterView, Decision, RequestInfo


class DynamoKVCost:
    """NVIDIA Dynamo's KV router: the least overlap-credited prefill blocks plus active decode blocks.

    Dynamo's default worker selector. Per worker, with block size B and overlap o blocks:

        potential_prefill_blocks = (worker's pending prefill tokens + prompt - o * B) / B
        potential_decode_blocks  = worker's active KV blocks + (ceil(prompt / B) - o)
        logit = overlap_score_weight * potential_prefill_blocks + potential_decode_blocks

    Temperature 0 (default): the lowest logit, random among equals. Temperature T > 0: softmax over
    -logit / (max - min) / T (uniform if all equal), sampled.

    Sources: ai-dynamo/dynamo lib/llm/src/kv_router/scheduler.rs (`DefaultWorkerSelector`,
    `softmax_sample`) and the active-sequence accounting (`potential_blocks_and_tokens`: active blocks
    plus the request's new blocks; active prefill tokens plus the request's uncached tokens);
    docs/router/README.md ("logit = kv_overlap_score_weight x potential_prefill_blocks +
    potential_active_blocks"; --kv-overlap-score-weight 1.0, --router-temperature 0.0).
    Here: pending prefill tokens = `view.pending_prefill_tokens`; active blocks = KV in use
    (`kv_usage * max_kv_tokens`) / B; the request's new blocks are those beyond its prefix match;
    B = the request's `tokens_per_block` unless `block_size` is given. Scores: minus the logit.
    """

    name = "dynamo_kv_cost"

    def __init__(
        self,
        overlap_score_weight: Annotated[float, Field(ge=0, description=(
            "weight of the prefill blocks against the decode blocks"))] = 1.0,
        temperature: Annotated[float, Field(ge=0, description=(
            "0: the lowest cost; above 0: a softmax draw over normalized costs at this temperature"))] = 0.0,
        block_size: Annotated[int | None, Field(ge=1, description=(
            "tokens per KV block (default: the request's prefix block size)"))] = None,
        seed: int = 0,
    ):
        self.overlap_score_weight = overlap_score_weight
        self.temperature = temperature
        self.block_size = block_size
        self._rng = random.Random(seed)

    def logits(self, request: RequestInfo, view: ClusterView) -> np.ndarray:
        """Each worker's cost of taking `request` (lower is better)."""
        b = float(self.block_size or request.tokens_per_block or 1)
        prompt = float(request.prompt_tokens)
        overlap = np.minimum(np.floor(view.matched_prefix_tokens / b), math.ceil(prompt / b))
        new_prefill_tokens = np.maximum(prompt - overlap * b, 0.0)
        prefill_blocks = (view.pending_prefill_tokens + new_prefill_tokens) / b
        decode_blocks = view.kv_usage * view.max_kv_tokens / b + (math.ceil(prompt / b) - overlap)
        return self.overlap_score_weight * prefill_blocks + decode_blocks

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The lowest-cost worker (or a softmax draw over costs when temperature > 0)."""
        require_workers(view)
        logits = self.logits(request, view)
        return decide(self.name, view, self._pick(logits), -logits)

    def _pick(self, logits: np.ndarray) -> int:
        if self.temperature == 0.0:
            return argmin_random_tie(logits.tolist(), self._rng)
        lo, hi = float(logits.min()), float(logits.max())
        if lo == hi:
            return self._rng.randrange(len(logits))
        scaled = -logits / (hi - lo) / self.temperature
        p = np.exp(scaled - scaled.max())
        cumulative = np.cumsum(p / p.sum())
        i = int(np.searchsorted(cumulative, self._rng.random(), side="left"))
        return min(i, len(logits) - 1)
