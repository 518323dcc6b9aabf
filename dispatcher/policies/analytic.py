"""`analytic`: the least TTFT estimated from the calibrated engine model (lodestar.ttft_estimate), no learning.

What the `learned` policy routes with until a learned correction beats it on held-out data (its decisions
are then labelled `learned/analytic`); on its own, the no-learning option: no learner, no snapshot, no
per-worker correction, the same decision for the same view.
"""

from __future__ import annotations

import random

from dispatcher.policies.baselines.common import argmin_random_tie, decide, require_workers
from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.ttft_estimate import estimate_ttft_ms

NAME = "analytic"


class AnalyticTTFT:
    """Least estimated TTFT, random among equals. Scores: minus the estimate (ms)."""

    name = NAME

    def __init__(self, seed: int = 0):  # no parameters: the coefficients come from the engine model
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        require_workers(view)
        est = estimate_ttft_ms(request, view)
        d = decide(self.name, view, argmin_random_tie(est.tolist(), self._rng), -est)
        d.predicted_ttft_ms = float(est[d.index])
        return d
