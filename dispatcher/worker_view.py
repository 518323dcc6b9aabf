"""The dispatcher's view of the workers: the Redis registry, at most `staleness_s` old, as a ClusterView.

Worker heartbeats lag the dispatcher's own decisions, so the view also remembers what this dispatcher
assigned since: an assignment counts on top of a worker's reported state until that worker publishes a
state written `settle_ms` after the assignment (by then it has consumed the request and counts it itself).

The per-worker arrays are built once per registry read (a few times a second), not per batch, and the
assignments not yet settled are kept as running totals per worker, so a batch's ClusterView costs a few
array copies whatever the number of workers (docs/performance.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from lodestar.cluster_view import ClusterView
from lodestar.schemas import WorkerState, now_ms
from lodestar.worker_registry import WorkerRegistry

SETTLE_MS = 100.0


@dataclass(frozen=True, slots=True)
class Assignment:
    """One request this dispatcher sent to a worker, not yet visible in the worker's own state."""

    routed_at_ms: float
    uncached_tokens: int


class WorkerView:
    """Routable workers (heartbeat alive, not draining) and their state plus recent local assignments."""

    def __init__(
        self,
        registry: WorkerRegistry,
        staleness_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        settle_ms: float = SETTLE_MS,
    ):
        self._registry = registry
        self._staleness_s = staleness_s
        self._clock = clock
        self._settle_ms = settle_ms
        self._refreshed_at: float | None = None
        self._live: list[WorkerState] = []
        self._pending: dict[str, deque[Assignment]] = {}
        self._base = _RoutableArrays.of([])
        self.generation = 0  # counts registry reads installed: who refreshed is not who reacts to a new listing

    @property
    def live(self) -> list[WorkerState]:
        """Every worker whose heartbeat has not expired, draining or not, as of the last refresh."""
        return list(self._live)

    @property
    def routable(self) -> list[WorkerState]:
        """Workers that may be given new requests: alive and not draining."""
        return [w for w in self._live if not w.draining]

    async def refresh(self, *, force: bool = False) -> bool:
        """Re-read the registry if the view is older than the staleness bound; True if it did."""
        now = self._clock()
        if not force and self._refreshed_at is not None and now - self._refreshed_at < self._staleness_s:
            return False
        self.replace(await self._registry.live_workers())
        self._refreshed_at = now
        return True

    def replace(self, live: list[WorkerState]) -> None:
        """Install a fresh registry listing and drop the local assignments the workers now report."""
        self._live = sorted(live, key=lambda w: w.worker_id)
        self.generation += 1
        states = {w.worker_id: w for w in self._live}
        for wid in list(self._pending):
            state = states.get(wid)
            if state is None:
                del self._pending[wid]
                continue
            queue = self._pending[wid]
            while queue and queue[0].routed_at_ms + self._settle_ms <= state.updated_at:
                queue.popleft()
        self._base = _RoutableArrays.of(self.routable)
        for wid, queue in self._pending.items():
            self._base.add(wid, len(queue), sum(a.uncached_tokens for a in queue))

    def note_assigned(self, worker_id: str, uncached_tokens: int, routed_at_ms: float | None = None) -> None:
        """Remember that this dispatcher sent a request to `worker_id` (counted until the worker reports it)."""
        at = now_ms() if routed_at_ms is None else routed_at_ms
        self._pending.setdefault(worker_id, deque()).append(Assignment(at, uncached_tokens))
        self._base.add(worker_id, 1, uncached_tokens)

    def cluster_view(self) -> ClusterView:
        """A fresh ClusterView over the routable workers (own arrays; matched prefix all zero)."""
        return self._base.view()


@dataclass(slots=True)
class _RoutableArrays:
    """The routable workers' reported state as arrays, with this dispatcher's unsettled assignments added
    to `inflight` and `pending_prefill_tokens`. Its views share the arrays that routing does not change."""

    index: dict[str, int]
    view_template: ClusterView

    @classmethod
    def of(cls, workers: list[WorkerState]) -> _RoutableArrays:
        def column(name: str) -> np.ndarray:
            return np.array([getattr(w, name) for w in workers], dtype=np.float64)

        template = ClusterView(
            worker_ids=[w.worker_id for w in workers],
            gpu_types=[w.gpu_type for w in workers],
            running=column("running"),
            waiting=column("waiting"),
            inflight=column("inflight"),
            pending_prefill_tokens=column("pending_prefill_tokens"),
            kv_usage=column("kv_usage"),
            max_kv_tokens=column("max_kv_tokens"),
            recent_ttft_ms=column("recent_ttft_ms"),
            matched_prefix_tokens=np.zeros(len(workers), dtype=np.float64),
            recent_output_tokens=column("recent_output_tokens"),
        )
        for arr in (template.running, template.waiting, template.kv_usage, template.max_kv_tokens,
                    template.recent_ttft_ms, template.matched_prefix_tokens, template.gpu_speed,
                    template.recent_output_tokens):
            arr.setflags(write=False)  # shared by every view: routing changes only inflight and pending prefill
        return cls({w.worker_id: i for i, w in enumerate(workers)}, template)

    def add(self, worker_id: str, requests: int, uncached_tokens: int) -> None:
        i = self.index.get(worker_id)
        if i is not None:
            self.view_template.inflight[i] += requests
            self.view_template.pending_prefill_tokens[i] += uncached_tokens

    def view(self) -> ClusterView:
        t = self.view_template
        return ClusterView(list(t.worker_ids), list(t.gpu_types), t.running, t.waiting, t.inflight.copy(),
                           t.pending_prefill_tokens.copy(), t.kv_usage, t.max_kv_tokens, t.recent_ttft_ms,
                           t.matched_prefix_tokens, t.gpu_speed, now_ms(), t.recent_output_tokens)
