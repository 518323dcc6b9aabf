"""LMetric: uncached prefill work on a worker times its batch size, lowest wins."""

from __future__ import annotations

import random

import numpy as np

from dispatcher.policies.baselines.common import (
    argmin_random_tie,
    decide,
    matched_blocks,
    outstanding_requests,
    require_workers,
)
from lodestar.cluster_view import ClusterView, Decision, RequestInfo


class LMetric:
    """LMetric: the least (pending + new uncached prefill tokens) x (pending requests + 1).

    LMetric (arXiv 2603.15202, section 5.1) as AIBrix's `l-metric-local` router implements it:

        hit_tokens = prompt * match_percent // 100, match_percent = matched blocks * 100 // blocks
        L  = pending uncached tokens on the worker + (prompt - hit_tokens)
        BS = pending requests on the worker + 1
        cost = L * BS, lowest wins, random among equals.

    Source: vllm-project/aibrix pkg/plugins/gateway/algorithms/l_metric_local.go (`ScoreAll`, `Route`;
    commit 2519ad59951ec9dc643286bee83d62140eda0cc4). llm-d's proposed `lmetric-scorer`
    (llm-d/llm-d-router PR 2351) uses the same product with only the new request's uncached tokens.
    Here: pending uncached tokens = `view.pending_prefill_tokens` (AIBrix's router counts a request's
    uncached tokens until it completes, llm-d's in-flight load producer releases them at the first
    token, as this field does); pending requests = `outstanding_requests`. Scores: minus the cost.
    """

    name = "lmetric"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def costs(self, request: RequestInfo, view: ClusterView) -> np.ndarray:
        """L * BS for every worker (lower is better)."""
        prompt = request.prompt_tokens
        total_blocks = len(request.block_hashes) or prompt // max(request.tokens_per_block, 1)
        if total_blocks > 0:
            percent = (np.minimum(matched_blocks(view, request.tokens_per_block), total_blocks) * 100) // total_blocks
            hit = (prompt * percent) // 100
        else:
            hit = np.zeros(view.size)
        new_tokens = prompt - hit
        return (view.pending_prefill_tokens + new_tokens) * (outstanding_requests(view) + 1.0)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The worker with the lowest L * BS."""
        require_workers(view)
        cost = self.costs(request, view)
        return decide(self.name, view, argmin_random_tie(cost.tolist(), self._rng), -cost)
