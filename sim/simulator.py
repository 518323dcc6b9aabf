"""The discrete-event cluster simulator: engine models in virtual time with a routing policy in the loop.

Events live on one heap ordered by (time, kind, sequence): an engine step finishing, a request
arriving, an idle engine being kicked to start its next step (after every arrival of the same instant,
so simultaneous arrivals batch together), and scheduled slowdowns. An engine runs one step at a time;
the step's effects (first tokens, finished requests) are applied when it completes. Pure-decode steps
may fuse iterations, but never past the iteration in progress when the next request arrives (nor past
a scheduled event), so a new request waits at most for the iteration it arrived during, as in SGLang.

The policy sees only what a router can know (see docs/architecture.md): the router-side prefix index built from
its own routing history (the chosen worker's set gets the request's blocks at routing time, per-worker
capacity = the engine's KV tokens / block size, LRU), in-flight counts the router keeps itself, and
engine load snapshots (running, waiting, pending prefill, KV usage, recent TTFT) re-read when a request
arrives and the last snapshot is `refresh_interval_s` old or older, as the live dispatcher refreshes
its view of the registry; between refreshes, the router adds the uncached prompt tokens it has routed
since the snapshot to each worker's pending prefill. Pending prefill is what a live worker publishes
(workers/live_state.py): the router's uncached-token estimate of the requests sent to it that have not
had their first token yet (queued or being prefilled), not the engine's own count of unprefilled prompt
tokens (which holds queued prompts whole, cached prefix included, and drops a prompt as soon as its
prefill step starts).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dispatcher.policies.base import Policy
from dispatcher.prefix_index import InMemoryPrefixIndex
from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.features import chosen_features
from lodestar.hardware import relative_speed
from lodestar.worker_averages import OUTPUT_ALPHA, TTFT_ALPHA, smoothed
from sim.cluster import ClusterSpec, WorkerSpec
from sim.engine import Engine, EngineConfig, EngineRequest, QueueFull, RequestTooLarge, StepOutcome
from sim.records import CompletedRequest
from sim.telemetry import TelemetrySink
from sim.workloads import Slowdown, WorkloadRequest

# Event kinds, in processing order among events of the same instant.
_STEP_DONE, _EVENT, _ARRIVAL, _KICK = 0, 1, 2, 3
# Engine finish reasons that count as a successful completion (as bench_serving's `success`).
_OK_REASONS = frozenset({"stop", "length"})


@dataclass(slots=True)
class _InFlight:
    request: RequestInfo
    decision: Decision
    worker: int
    features: np.ndarray | None
    matched_prefix_tokens: int
    arrival_s: float
    first_token_s: float = math.nan


@dataclass(slots=True)
class SimResult:
    """Everything one run produced; `metrics.summarize` turns it into bench_serving numbers."""

    records: list[CompletedRequest]
    failed: int
    routed_gpu_types: list[str]
    itl_s: np.ndarray
    itl_tokens: np.ndarray
    retracted: int
    end_s: float
    wall_s: float
    steps: int
    arrivals: int
    gpu_types: list[str] = field(default_factory=list)


def build_engines(workers: Sequence[WorkerSpec], seed: int) -> list[Engine]:
    """One engine per worker, each with its own seed derived from `seed`."""
    return [Engine(w.gpu, w.model, config=EngineConfig(**w.engine) if w.engine else None, seed=seed * 1009 + i)
            for i, w in enumerate(workers)]


class Simulator:
    """One run of a cluster under a policy (build a new one per run). Deterministic given the policy, the
    requests and `seed`."""

    def __init__(self, cluster: ClusterSpec, policy: Policy, *, seed: int = 0, refresh_interval_s: float = 0.1,
                 sink: TelemetrySink | None = None, drain_timeout_s: float = 900.0):
        if refresh_interval_s <= 0:
            raise ValueError("refresh_interval_s must be > 0")
        self.workers = cluster.expand()
        self.engines = build_engines(self.workers, seed)
        self.worker_ids = [w.worker_id for w in self.workers]
        self.gpu_types = [e.gpu_type for e in self.engines]
        self.refresh_interval_s = refresh_interval_s
        self.drain_timeout_s = drain_timeout_s
        self.sink = sink
        self.now = 0.0
        n = len(self.engines)
        # Engine-side time: an engine is busy until its running step completes.
        self.busy_until = np.zeros(n)
        self._busy = [False] * n
        self._kicked = [False] * n
        self._monotone_steps = [e.cfg.step_time_jitter == 0 for e in self.engines]
        # Router-side state.
        self.index = InMemoryPrefixIndex(0)
        self._index_block_tokens = 0
        self._gpu_speed = np.array([relative_speed(t) for t in self.gpu_types], dtype=np.float64)
        self._max_kv = np.array([e.max_kv_tokens for e in self.engines], dtype=np.float64)
        self._running = np.zeros(n)
        self._waiting = np.zeros(n)
        self._pending_prefill = np.zeros(n)
        self._awaiting_first_token = np.zeros(n)  # uncached tokens routed, first token not yet out (live worker's)
        self._kv_usage = np.zeros(n)
        self._recent_ttft_view = np.zeros(n)
        self._recent_ttft = np.zeros(n)
        self._recent_output_view = np.zeros(n)
        self._recent_output = np.zeros(n)
        self._inflight = np.zeros(n)
        self.policy = policy
        bind = getattr(policy, "bind_simulator", None)
        if bind is not None:
            bind(self)  # the oracle reads the engines
        # Run state.
        self._heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self._stream: Iterator[WorkloadRequest] = iter(())
        self._next_arrival_s = math.inf
        self._pending_events: list[Slowdown] = []
        self._inflight_reqs: dict[str, _InFlight] = {}
        self._records: list[CompletedRequest] = []
        self._routed_types: list[str] = []
        self._itl_s: list[float] = []
        self._itl_tokens: list[int] = []
        self._retracted = 0
        self._failed_in_engine = 0
        self._rejected = 0
        self._steps = 0
        self._arrivals = 0
        self._last_arrival_s = 0.0
        self._refreshed_at = -math.inf
        self._ran = False

    # -- public ------------------------------------------------------------------------------------

    def run(self, requests: Iterable[WorkloadRequest], slowdowns: Sequence[Slowdown] = (),
            progress: Callable[[float], None] | None = None) -> SimResult:
        """Feed `requests` (in arrival order) through the cluster until every one has finished."""
        if self._ran:
            raise RuntimeError("a Simulator runs once; build a new one for another run")
        self._ran = True
        wall0 = time.perf_counter()
        self._stream = iter(requests)
        self._pending_events = sorted(slowdowns, key=lambda e: e.at_s)
        for ev in self._pending_events:
            self._push(ev.at_s, _EVENT, ev)
        self._pull_arrival()
        events = 0
        heap = self._heap
        sink = self.sink
        while heap:
            t, kind, _, payload = heapq.heappop(heap)
            if self._next_arrival_s == math.inf and t > self._last_arrival_s + self.drain_timeout_s:
                break
            self.now = t
            if sink is not None:
                sink.tick(t)
            if kind == _STEP_DONE:
                self._step_done(*payload)
            elif kind == _ARRIVAL:
                self._arrive(payload)
            elif kind == _KICK:
                self._kick(payload)
            else:
                self._apply_event(payload)
            events += 1
            if progress is not None and events % 2048 == 0:
                progress(t)
        failed = len(self._inflight_reqs)
        for rid in list(self._inflight_reqs):
            self.engines[self._inflight_reqs.pop(rid).worker].abort(rid)
        if progress is not None:
            progress(self.now)
        return SimResult(
            records=self._records, failed=failed + self._failed_in_engine + self._rejected,
            routed_gpu_types=self._routed_types,
            itl_s=np.array(self._itl_s), itl_tokens=np.array(self._itl_tokens, dtype=np.int64),
            retracted=self._retracted, end_s=self.now, wall_s=time.perf_counter() - wall0, steps=self._steps,
            arrivals=self._arrivals, gpu_types=list(self.gpu_types))

    def cluster_view(self, matched_prefix_tokens: np.ndarray) -> ClusterView:
        """What the router sees now (arrays shared with the simulator: policies must not write to them)."""
        return ClusterView(self.worker_ids, self.gpu_types, self._running, self._waiting, self._inflight,
                           self._pending_prefill, self._kv_usage, self._max_kv, self._recent_ttft_view,
                           matched_prefix_tokens, self._gpu_speed, self.now * 1000.0, self._recent_output_view)

    # -- internals ---------------------------------------------------------------------------------

    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, kind, self._seq, payload))

    def _pull_arrival(self) -> None:
        req = next(self._stream, None)
        if req is None:
            self._next_arrival_s = math.inf
            return
        self._next_arrival_s = req.arrival_s
        self._push(req.arrival_s, _ARRIVAL, req)

    def _refresh(self) -> None:
        for i, eng in enumerate(self.engines):
            load = eng.load()
            self._running[i] = load.running
            self._waiting[i] = load.waiting
            self._pending_prefill[i] = self._awaiting_first_token[i]
            self._kv_usage[i] = load.token_usage
        self._recent_ttft_view[:] = self._recent_ttft
        self._recent_output_view[:] = self._recent_output

    def _arrive(self, req: WorkloadRequest) -> None:
        now = self.now
        if now - self._refreshed_at >= self.refresh_interval_s:
            self._refresh()
            self._refreshed_at = now
        self._arrivals += 1
        self._last_arrival_s = now
        info = RequestInfo(req.rid, req.prompt_len, req.block_hashes, req.block_tokens, req.session_id,
                           req.max_new_tokens)
        self._ensure_index_block_tokens(req.block_tokens)
        matched = self.index.match(req.block_hashes, self.worker_ids) * req.block_tokens
        view = self.cluster_view(matched.astype(np.float64))
        decision = self.policy.choose(info, view)
        i = decision.index
        features = chosen_features(info, view, decision) if self.sink is not None else None
        matched_i = int(min(matched[i], max(req.prompt_len - 1, 0)))
        self.index.insert(self.worker_ids[i], req.block_hashes, now)
        uncached = req.prompt_len - matched_i
        self._inflight[i] += 1
        self._pending_prefill[i] += uncached
        self._awaiting_first_token[i] += uncached
        self._routed_types.append(self.gpu_types[i])
        try:
            self.engines[i].add(EngineRequest(req.rid, req.prompt_len, req.block_hashes, req.block_tokens,
                                              req.max_new_tokens, now,
                                              output_block_hashes=req.output_block_hashes), now)
        except (QueueFull, RequestTooLarge):
            self._inflight[i] -= 1  # rejected at once, as SGLang answers an oversized or over-queue request
            self._pending_prefill[i] -= uncached
            self._awaiting_first_token[i] -= uncached
            self._rejected += 1
            self._pull_arrival()
            return
        self._inflight_reqs[req.rid] = _InFlight(info, decision, i, features, matched_i, now)
        if not self._busy[i] and not self._kicked[i]:
            self._kicked[i] = True
            self._push(now, _KICK, i)
        self._pull_arrival()

    def _ensure_index_block_tokens(self, block_tokens: int) -> None:
        """Size each worker's prefix-index capacity in blocks of this workload's block size."""
        if block_tokens == self._index_block_tokens:
            return
        self._index_block_tokens = block_tokens
        for wid, eng in zip(self.worker_ids, self.engines, strict=True):
            self.index.set_capacity(wid, eng.max_kv_tokens // block_tokens)

    def _kick(self, i: int) -> None:
        self._kicked[i] = False
        if self._busy[i] or not self.engines[i].has_work():
            return
        now = self.now
        engine = self.engines[i]
        until = self._next_arrival_s
        n = len(engine.running)
        if n and self._monotone_steps[i]:
            # A fused decode run may end up to a lower bound on one iteration (its time without the
            # context term) after the next arrival. SGLang reads its queue between iterations, so a
            # request arriving mid-iteration waits for that iteration: the bound includes the iteration
            # in progress at the arrival and never one starting after it (a pure-decode run's
            # iterations only grow), and saves a step per arrival and busy engine. Not with step-time
            # jitter, where iteration times are not monotone.
            until += engine.perf.decode_base(n) * engine.slowdown
        if self._pending_events and self._pending_events[0].at_s < until:
            until = self._pending_events[0].at_s
        for _ in range(2):
            outcome = engine.step(now, until=until if until > now else None)
            self._steps += 1
            if outcome.iterations or outcome.duration_s > 0 or outcome.finished:
                break
            if not engine.has_work():
                return
            # An idle iteration can unblock the queue (SGLang resets the full-batch flag when idle) and
            # SGLang's loop iterates again at once; a second idle one means nothing can run until a
            # new request comes.
        else:
            return
        self._busy[i] = True
        self.busy_until[i] = now + outcome.duration_s
        self._push(now + outcome.duration_s, _STEP_DONE, (i, outcome))

    def _step_done(self, i: int, outcome: StepOutcome) -> None:
        now = self.now
        self._busy[i] = False
        if outcome.kind == "decode":
            self._itl_s.append(outcome.duration_s / outcome.iterations)
            self._itl_tokens.append(outcome.batch_size * outcome.iterations)
        elif outcome.iterations > 0:
            decode_tokens = sum(outcome.tokens.values()) - len(outcome.first_tokens)
            if decode_tokens > 0:
                self._itl_s.append(outcome.duration_s / outcome.iterations)
                self._itl_tokens.append(decode_tokens)
        if outcome.first_tokens:
            self._first_tokens(i, outcome, now)
        if outcome.retracted:
            self._retracted += len(outcome.retracted)
        if outcome.finished:
            self._finished(outcome, now)
        if self._kicked[i]:
            return
        if self._next_arrival_s > now and not (self._pending_events and self._pending_events[0].at_s <= now):
            self._kick(i)  # nothing else happens at this instant: start the next step at once
        else:
            self._kicked[i] = True
            self._push(now, _KICK, i)

    def _first_tokens(self, i: int, outcome: StepOutcome, now: float) -> None:
        inflight = self._inflight_reqs
        for ft in outcome.first_tokens:
            rec = inflight.get(ft.rid)
            if rec is None:
                continue
            rec.first_token_s = now
            self._awaiting_first_token[i] -= rec.request.prompt_tokens - rec.matched_prefix_tokens
            ttft_ms = (now - rec.arrival_s) * 1000.0
            self._recent_ttft[i] = smoothed(self._recent_ttft[i], ttft_ms, TTFT_ALPHA)

    def _finished(self, outcome: StepOutcome, now: float) -> None:
        inflight = self._inflight_reqs
        for fin in outcome.finished:
            rec = inflight.pop(fin.rid, None)
            if rec is None:
                continue
            self._inflight[rec.worker] -= 1
            if math.isnan(rec.first_token_s):  # ended before its first token (aborted)
                self._awaiting_first_token[rec.worker] -= rec.request.prompt_tokens - rec.matched_prefix_tokens
            if fin.reason not in _OK_REASONS or math.isnan(rec.first_token_s):
                self._failed_in_engine += 1
                continue
            done = CompletedRequest(rec.request, rec.decision, self.gpu_types[rec.worker], rec.features,
                                    rec.matched_prefix_tokens, rec.arrival_s, rec.first_token_s, now,
                                    fin.prompt_tokens, fin.cached_tokens, fin.completion_tokens, fin.reason)
            self._records.append(done)
            if fin.completion_tokens:
                self._recent_output[rec.worker] = smoothed(self._recent_output[rec.worker], fin.completion_tokens,
                                                           OUTPUT_ALPHA)
            if self.sink is not None:
                self.sink.observe(done)

    def _apply_event(self, event: Slowdown) -> None:
        self._pending_events.remove(event)
        i = event.worker if isinstance(event.worker, int) else self.worker_ids.index(event.worker)
        self.engines[i].set_slowdown(event.factor)
