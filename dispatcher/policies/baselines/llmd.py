"""llm-d inference scheduler (Gateway API Inference Extension EPP): weighted scorers, max-score pick."""

from __future__ import annotations

import random
from typing import Annotated

import numpy as np
from pydantic import Field

from dispatcher.policies.baselines.common import argmax_random_tie, decide, matched_blocks, require_workers
from lodestar.cluster_view import ClusterView, Decision, RequestInfo


class LlmdWeighted:
    """llm-d's default scheduling profile: the highest weighted sum of queue, KV-cache and prefix scores.

    Queue-scorer x2 + kv-cache-utilization-scorer x2 + prefix-cache-scorer x3, then the max-score picker
    (random among equal totals).

    - queue: (max_waiting - waiting) / (max_waiting - min_waiting) over the candidates, 1.0 for all
      when every queue is the same length (waiting = the engine's waiting queue size);
    - kv-cache utilization: 1 - kv_usage;
    - prefix: matched blocks / request blocks, both capped at `max_prefix_blocks` (256: the scorer
      hashes at most that many blocks), 0 for a request shorter than one block.

    Sources: kubernetes-sigs/gateway-api-inference-extension
    config/charts/inferencepool/templates/epp-config.yaml (default-plugins.yaml: weights 2, 2, 3),
    pkg/epp/scheduling/framework/plugins/scorer/queue.go, .../scorer/kvcache_utilization.go,
    .../prefixcachescorer/plugin.go (score = longest match / total hashed blocks;
    DefaultMaxPrefixBlocks = 256), .../picker/max_score_picker.go (shuffle, then highest score).
    The prefix scorer's LRU indexer is the router-side prefix index behind `view.matched_prefix_tokens`.
    Scores: the weighted total.
    """

    name = "llmd_weighted"

    def __init__(
        self,
        queue_weight: Annotated[float, Field(ge=0, description="weight of the queue scorer")] = 2.0,
        kv_cache_weight: Annotated[float, Field(ge=0, description="weight of the KV-cache utilization scorer")] = 2.0,
        prefix_weight: Annotated[float, Field(ge=0, description="weight of the prefix-cache scorer")] = 3.0,
        max_prefix_blocks: Annotated[int, Field(ge=1, description="prefix blocks the prefix scorer counts at "
                                                                  "most")] = 256,
        seed: int = 0,
    ):
        self.queue_weight = queue_weight
        self.kv_cache_weight = kv_cache_weight
        self.prefix_weight = prefix_weight
        self.max_prefix_blocks = max_prefix_blocks
        self._rng = random.Random(seed)

    def total_scores(self, request: RequestInfo, view: ClusterView) -> np.ndarray:
        """The weighted sum of the three scorers for every worker (higher is better)."""
        waiting = view.waiting
        lo, hi = float(waiting.min()), float(waiting.max())
        queue = np.ones(view.size) if hi == lo else (hi - waiting) / (hi - lo)
        kv = 1.0 - view.kv_usage
        total_blocks = len(request.block_hashes) or request.prompt_tokens // max(request.tokens_per_block, 1)
        total_blocks = min(total_blocks, self.max_prefix_blocks)
        if total_blocks > 0:
            prefix = np.minimum(matched_blocks(view, request.tokens_per_block), total_blocks) / total_blocks
        else:
            prefix = np.zeros(view.size)
        return self.queue_weight * queue + self.kv_cache_weight * kv + self.prefix_weight * prefix

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The worker with the highest weighted score."""
        require_workers(view)
        total = self.total_scores(request, view)
        return decide(self.name, view, argmax_random_tie(total.tolist(), self._rng), total)
