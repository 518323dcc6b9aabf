"""What a router knows when it routes one request: the request's shape and the cluster's state.

These types are the inputs and output of every routing policy (dispatcher/policies). The live
dispatcher fills them from Redis, the simulator from its engines (with the same staleness rules).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Generic, TypeVar

import numpy as np

from lodestar.hardware import relative_speed


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A request as a router sees it."""

    request_id: str
    prompt_tokens: int
    block_hashes: tuple[int, ...] = ()
    tokens_per_block: int = 16
    session_id: str | None = None
    max_new_tokens: int = 128


@dataclass(slots=True)
class ClusterView:
    """Per-worker arrays (index i = worker i) of live state, plus this request's matched prefix."""

    worker_ids: list[str]
    gpu_types: list[str]
    running: np.ndarray
    waiting: np.ndarray
    inflight: np.ndarray
    pending_prefill_tokens: np.ndarray
    kv_usage: np.ndarray
    max_kv_tokens: np.ndarray
    recent_ttft_ms: np.ndarray
    matched_prefix_tokens: np.ndarray
    gpu_speed: np.ndarray = field(default_factory=lambda: np.zeros(0))
    now_ms: float = 0.0
    # each worker's smoothed completion tokens (lodestar.worker_averages); 0 where none finished yet
    recent_output_tokens: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __post_init__(self) -> None:
        n = len(self.worker_ids)
        if len(self.gpu_speed) != n:
            self.gpu_speed = np.array([relative_speed(t) for t in self.gpu_types], dtype=np.float64)
        if len(self.recent_output_tokens) != n:
            self.recent_output_tokens = np.zeros(n)
        for name in ("running", "waiting", "inflight", "pending_prefill_tokens", "kv_usage",
                     "max_kv_tokens", "recent_ttft_ms", "matched_prefix_tokens"):
            arr = getattr(self, name)
            if len(arr) != n:
                raise ValueError(f"ClusterView.{name} has {len(arr)} entries for {n} workers")

    @property
    def size(self) -> int:
        return len(self.worker_ids)

    def with_matched(self, matched_prefix_tokens: np.ndarray) -> ClusterView:
        """The same state with another request's matched prefix (cheap: arrays are shared, and only the new
        array's length is checked; this runs once per routing decision)."""
        if len(matched_prefix_tokens) != len(self.worker_ids):
            raise ValueError(f"{len(matched_prefix_tokens)} matched prefixes for {len(self.worker_ids)} workers")
        out = object.__new__(ClusterView)
        for name in _FIELDS:
            object.__setattr__(out, name, getattr(self, name))
        out.matched_prefix_tokens = matched_prefix_tokens
        return out

    def take(self, index: int) -> ClusterView:
        """Worker `index` alone, as a one-worker view (every per-worker feature reads its own worker only)."""
        s = slice(index, index + 1)
        return ClusterView([self.worker_ids[index]], [self.gpu_types[index]], self.running[s], self.waiting[s],
                           self.inflight[s], self.pending_prefill_tokens[s], self.kv_usage[s], self.max_kv_tokens[s],
                           self.recent_ttft_ms[s], self.matched_prefix_tokens[s], self.gpu_speed[s], self.now_ms,
                           self.recent_output_tokens[s])

    @classmethod
    def empty_like(cls, worker_ids: list[str], gpu_types: list[str]) -> ClusterView:
        """An idle cluster view (all zeros) over the given workers."""
        n = len(worker_ids)
        z = np.zeros(n, dtype=np.float64)
        return cls(list(worker_ids), list(gpu_types), z.copy(), z.copy(), z.copy(), z.copy(), z.copy(),
                   z.copy(), z.copy(), z.copy())


_FIELDS = tuple(f.name for f in fields(ClusterView))


@dataclass(slots=True)
class Decision:
    """A policy's choice for one request.

    `policy` labels who decided (`learned/<heuristic>` when the learned policy's fallback did); `scores`
    are per worker, higher preferred; `fallback` is true when a heuristic decided in place of the model;
    `features` is the chosen candidate's row of `lodestar.features.candidate_matrix` when the policy
    computed it (else None, and the caller computes it if it needs it).
    """

    index: int
    worker_id: str
    policy: str
    scores: np.ndarray | None = None
    explored: bool = False
    predicted_ttft_ms: float | None = None
    model_version: int = 0
    fallback: bool = False
    features: np.ndarray | None = None


T = TypeVar("T")


class GpuSetMemo(Generic[T]):
    """A value that depends only on a view's GPUs (`gpu_types` and `gpu_speed`), computed once per worker set
    instead of once per decision: `memo(view)` is `build(tuple(view.gpu_types), view.gpu_speed)`.

    The last view's type list is recognised by identity (the simulator keeps one list for its whole run, the
    views of one dispatcher batch share theirs) and its contents are still compared with a copy (the same
    string objects: a pointer comparison each) and the speeds with their bytes, so a list or an array changed
    in place is never served a stale value. Other worker sets go through a small LRU cache of the contents.
    """

    def __init__(self, build: Callable[[tuple[str, ...], np.ndarray], T], maxsize: int = 16):
        self._cached = lru_cache(maxsize)(lambda types, speed: build(types, np.frombuffer(speed)))
        self._last: tuple[list[str], list[str], bytes, T] | None = None

    def __call__(self, view: ClusterView) -> T:
        types, speed = view.gpu_types, view.gpu_speed.astype(np.float64, copy=False).tobytes()
        last = self._last
        if last is not None and last[0] is types and last[2] == speed and last[1] == types:
            return last[3]
        value = self._cached(tuple(types), speed)
        self._last = (types, list(types), speed, value)
        return value
