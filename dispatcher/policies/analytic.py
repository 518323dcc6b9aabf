"""`analytic`: the least TTFT estimated from the calibrated engine model (lodestar.ttft_estimate), no learning.

What the learned policy starts from on a cluster it has never seen; also a baseline in its own right.
"""

from __future__ import annotations

import random

from dispatcher.policies.base import register
from dispatcher.policies.baselines.common import argmin_random_tie, decide, require_workers
from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.ttft_estimate import estimate_ttft_ms

NAME = "analytic"


@register(NAME)
class AnalyticTTFT:
    """Least estimated TTFT, random among equals. Scores: minus the estimate (ms)."""

    name = NAME

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        require_workers(view)
        est = estimate_ttft_ms(request, view)
        d = decide(self.name, view, argmin_random_tie(est.tolist(), self._rng), -est)
        d.predicted_ttft_ms = float(est[d.index])
        return d
