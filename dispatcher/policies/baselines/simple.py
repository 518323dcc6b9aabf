"""Load-only baselines: round robin, random, least request, power of two choices."""

from __future__ import annotations

import random

import numpy as np

from dispatcher.policies.baselines.common import (
    argmin_random_tie,
    decide,
    outstanding_requests,
    require_workers,
)
from lodestar.cluster_view import ClusterView, Decision, RequestInfo


class RoundRobin:
    """Workers in turn: a counter modulo the number of workers.

    Source: lightseekorg/smg model_gateway/src/policies/round_robin.rs (the SGLang router's
    `round_robin`: an atomic counter, `fetch_add(1) % healthy workers`). Scores: 1 for the chosen
    worker, 0 elsewhere. The rotation starts at worker `seed mod n`, so seeds differ in phase only.
    """

    name = "round_robin"

    def __init__(self, seed: int = 0):
        self._counter = seed

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The next worker in turn."""
        require_workers(view)
        i = self._counter % view.size
        self._counter += 1
        scores = np.zeros(view.size)
        scores[i] = 1.0
        return decide(self.name, view, i, scores)


class UniformRandom:
    """A worker drawn uniformly at random (seeded).

    Source: lightseekorg/smg model_gateway/src/policies/random.rs (the SGLang router's `random`).
    Scores: 1 for the chosen worker, 0 elsewhere.
    """

    name = "random"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """A uniformly random worker."""
        require_workers(view)
        i = self._rng.randrange(view.size)
        scores = np.zeros(view.size)
        scores[i] = 1.0
        return decide(self.name, view, i, scores)


class LeastRequest:
    """The worker with the fewest outstanding requests; exact ties broken at random (seeded).

    Source: vllm-project/aibrix pkg/plugins/gateway/algorithms/least_request.go (`least-request`: the
    minimum of the gateway-tracked running request count per pod, random among equal minima).
    Load = `outstanding_requests` (common.py). Scores: minus the load.
    """

    name = "least_request"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The least loaded worker."""
        require_workers(view)
        load = outstanding_requests(view)
        i = argmin_random_tie(load.tolist(), self._rng)
        return decide(self.name, view, i, -load)


class PowerOfTwo:
    """Two distinct workers drawn at random (seeded); the less loaded one wins, the first on a tie.

    Source: lightseekorg/smg model_gateway/src/policies/power_of_two.rs (the SGLang router's
    `power_of_two`: idx1 uniform, idx2 = (idx1 + 1 + uniform(n - 1)) mod n, pick worker1 if
    load1 <= load2). Load = `outstanding_requests` (the router's request count, which that code uses
    whenever token loads are not available for both). Scores: minus the load for the two sampled
    workers, -inf for the others.
    """

    name = "power_of_two"

    def __init__(self, seed: int = 0):
        self._rng = random.Random(seed)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The less loaded of two random workers."""
        require_workers(view)
        n = view.size
        scores = np.full(n, -np.inf)
        load = outstanding_requests(view)
        if n == 1:
            scores[0] = -load[0]
            return decide(self.name, view, 0, scores)
        a = self._rng.randrange(n)
        b = (a + 1 + self._rng.randrange(n - 1)) % n
        scores[a], scores[b] = -load[a], -load[b]
        i = a if load[a] <= load[b] else b
        return decide(self.name, view, i, scores)
