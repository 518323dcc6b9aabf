"""The oracle policy (simulator only): route to the worker whose engine would give the least true TTFT.

For each candidate it copies the engine's exact state (its real cache and queues, not the router's
view), adds the request, and steps the copy forward without any future arrival until the request's
first token. It bounds what a greedy router can reach; it is not an upper bound on every router, since
a greedy choice can hurt requests that come later.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from sim.engine import Engine, EngineRequest

if TYPE_CHECKING:
    from sim.simulator import Simulator

NAME = "oracle"
# A copy that makes no progress for this many steps is treated as never serving the request.
MAX_STEPS = 100_000


def first_token_at(engine: Engine, request: EngineRequest, start_s: float, give_up_s: float = math.inf) -> float:
    """Virtual time of `request`'s first token on a copy of `engine` whose next step starts at `start_s`.

    Returns inf if the copy makes no progress, or once its clock passes `give_up_s` (a bound already
    beaten elsewhere). `engine` itself is left untouched.
    """
    copy = engine.clone()
    copy.add(request, request.arrival_s)
    t = start_s
    idle = False
    for _ in range(MAX_STEPS):
        if t > give_up_s:
            return math.inf
        outcome = copy.step(t)
        t += outcome.duration_s
        if any(ft.rid == request.rid for ft in outcome.first_tokens):
            return t
        if outcome.iterations or outcome.duration_s > 0 or outcome.finished:
            idle = False
        elif idle:
            return math.inf
        else:
            # As in the simulator (Simulator._kick): an idle iteration can unblock the queue (the engine
            # resets its full-batch flag and evicts for the next admission), a second one means no progress.
            idle = True
    return math.inf


class OraclePolicy:
    """Least true TTFT over all workers, by forward simulation of each engine copy."""

    name = NAME

    def __init__(self, seed: int = 0):
        self._sim: Simulator | None = None

    def bind_simulator(self, sim: Simulator) -> None:
        """Called by the simulator: the oracle reads its engines and clock."""
        self._sim = sim

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """Try every worker (most promising first, to prune the rest early) and keep the least TTFT."""
        sim = self._sim
        if sim is None:
            raise RuntimeError("the oracle policy runs only inside the simulator (bind_simulator was not called)")
        now = sim.now
        req = EngineRequest(request.request_id, request.prompt_tokens, request.block_hashes,
                            request.tokens_per_block, request.max_new_tokens, now)
        n = view.size
        ttft = np.full(n, math.inf)
        order = np.lexsort((view.inflight, view.pending_prefill_tokens / np.maximum(view.gpu_speed, 1e-6)))
        best = math.inf
        for i in order:
            start = max(now, float(sim.busy_until[i]))
            t = first_token_at(sim.engines[i], req, start, give_up_s=now + best)
            ttft[i] = t - now
            best = min(best, ttft[i])
        i = int(np.argmin(ttft))
        ttft_ms = ttft * 1000.0
        return Decision(i, view.worker_ids[i], NAME, scores=-ttft_ms, predicted_ttft_ms=float(ttft_ms[i]))
