"""GPU-speed-aware queue heuristic: queue length per unit of GPU speed, lowest wins."""

from __future__ import annotations

import random

import numpy as np

from dispatcher.policies.baselines.common import argmin_random_tie, decide, outstanding_requests, require_workers
from lodestar.cluster_view import ClusterView, Decision, RequestInfo


class GPUSpeedQueue:
    """GPU-speed-aware queue: the least (outstanding requests + 1) / GPU speed, random among equals.

    The project's own heterogeneity-aware heuristic (issue 4), not an external router: queue =
    `outstanding_requests`, gpu_speed = `view.gpu_speed` (peak compute relative to an A100, from
    lodestar.hardware). The +1 counts the request being routed, so an idle fast GPU beats an idle slow
    one and a queue on a GPU twice as fast counts half. It is also the learned policy's default fallback.
    Scores: minus the score.
    """

    name = "gpu_speed_queue"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The worker with the shortest queue per unit of speed."""
        require_workers(view)
        score = (outstanding_requests(view) + 1.0) / np.maximum(view.gpu_speed, 1e-9)
        return decide(self.name, view, argmin_random_tie(score.tolist(), self._rng), -score)
