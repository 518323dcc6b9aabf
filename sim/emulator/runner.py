"""Drives one engine model in wall-clock time and hands its output to the waiting HTTP handlers.

Clocks. The engine runs on an emulated clock `emu`, in seconds since the runner started. The wall
clock maps onto it by `wall = start + time_scale * emu`: with `time_scale` 1 the emulator runs in real
time; with 2 every engine step takes twice its modelled duration of wall time (so a slow or busy host
keeps up), and with 0.5 half of it. Everything a client measures (latencies in `meta_info`, the
`/metrics` histograms) is wall-clock time, as a client sees it: divide by `time_scale` to get back the
modelled GPU time.

Overhead correction. A step's start is a point on the emulated timeline, not "whenever the loop got
round to it": the next step starts where the previous one ended, or at the arrival of the request that
woke an idle engine. The runner then sleeps until the wall time of the step's end and delivers its
effects. Time spent in Python (the engine's own bookkeeping, HTTP handlers, the event loop waking up
late) is therefore absorbed instead of accumulated; only when the host falls behind by more than a
whole step do deliveries slip, and `lag_s` says by how much. The event loop wakes a sleeper up to a
millisecond late (epoll's resolution, plus scheduling on a busy host); the runner learns that lateness
and sets its alarm correspondingly early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from lodestar.hashing import token_block_hashes
from sim.emulator.metrics import EmulatorMetrics
from sim.engine import Engine, EngineRequest, StepOutcome

logger = logging.getLogger(__name__)

LATENESS_WEIGHT = 0.1  # of the latest wake-up in the running average of wake-up lateness
MAX_LATENESS_S = 0.005  # a longer stall (GC, a host out of CPU) is not something to anticipate
IDLE_RECHECK_S = 0.01  # wall seconds between looks at an engine that has work but starts none


@dataclass(slots=True)
class RequestState:
    """What the HTTP handler of one request needs to know; the runner updates it and sets `changed`."""

    rid: str
    prompt_tokens: int
    stop_at: tuple[int, str | int] | None  # (tokens, matched) when a stop string, regex or token ends it
    log_metrics: bool
    created_wall: float
    arrival_emu: float
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    group: asyncio.Event | None = None  # also set on every change, for a handler following several states
    completion_tokens: int = 0
    cached_tokens: int = 0
    retractions: int = 0
    first_token_wall: float | None = None
    first_token_emu: float | None = None
    last_token_wall: float | None = None
    finish_reason: dict[str, Any] | None = None
    finished_wall: float | None = None
    finished_emu: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def notify(self) -> None:
        """Wake whoever follows this state."""
        self.changed.set()
        if self.group is not None:
            self.group.set()

    async def wait_finished(self) -> None:
        """Return once the request has finished (or was aborted)."""
        while self.finish_reason is None:
            await self.changed.wait()
            self.changed.clear()

    def e2e_latency(self) -> float:
        """Wall seconds from receipt to the last token (or to now while running)."""
        end = self.finished_wall if self.finished_wall is not None else time.perf_counter()
        return end - self.created_wall


class DuplicateRequestId(ValueError):
    """A request id is already in flight."""


class EngineRunner:
    """One asyncio task stepping `engine` in (scaled) wall-clock time."""

    def __init__(self, engine: Engine, metrics: EmulatorMetrics, time_scale: float = 1.0,
                 block_tokens: int = 16) -> None:
        if time_scale <= 0.0:
            raise ValueError("time_scale must be > 0")
        if block_tokens < 1:
            raise ValueError("block_tokens must be >= 1")
        self.engine = engine
        self.metrics = metrics
        self.time_scale = time_scale
        self.block_tokens = block_tokens
        self.states: dict[str, RequestState] = {}
        self.lag_s = 0.0  # emulated seconds the latest step started behind the wall clock
        self.max_lag_s = 0.0
        self.steps = 0
        self._decode_iterations = 0  # since the last decode log line
        self.error: BaseException | None = None
        self._start_wall = time.perf_counter()
        self._clock = 0.0  # emulated end of the latest step
        self._latest_arrival = 0.0
        self._wake = asyncio.Event()
        self._wake_lateness = 0.0005  # seconds; learnt from how late asyncio.sleep returns
        self._task: asyncio.Task[None] | None = None

    # ---- clocks -----------------------------------------------------------------------------

    def emu_now(self) -> float:
        """The emulated time now."""
        return (time.perf_counter() - self._start_wall) / self.time_scale

    def wall_at(self, emu: float) -> float:
        """The `time.perf_counter()` value at which emulated time `emu` happens."""
        return self._start_wall + emu * self.time_scale

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the stepping task on the running event loop."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="engine-runner")

    async def stop(self) -> None:
        """Stop stepping and abort whatever is still in flight."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for state in list(self.states.values()):
            self._finish(state, {"type": "abort", "message": "The server is shutting down."},
                         time.perf_counter(), self.emu_now())

    @property
    def healthy(self) -> bool:
        """True while the stepping task is alive."""
        return self.error is None and self._task is not None and not self._task.done()

    # ---- requests ---------------------------------------------------------------------------

    def submit(self, rid: str, input_ids: list[int], max_new_tokens: int,
               stop_at: tuple[int, str | int] | None, log_metrics: bool = True,
               received_wall: float | None = None, cache_salt: str | None = None) -> RequestState:
        """Queue a request in the engine.

        `stop_at` is where a stop string, regex or token ends the generation early (the engine, like
        SGLang, does not know that in advance and budgets KV for `max_new_tokens`); `max_new_tokens` 0
        is a prefill-only request. Raises `sim.engine.QueueFull`, `sim.engine.RequestTooLarge` (a
        ValueError) or `DuplicateRequestId`. `received_wall` is when the HTTP request came in: the
        request arrives in the engine then, so the time spent parsing and validating it is absorbed
        rather than added to its latency. Requests with different `cache_salt`s share no cached prefix."""
        if rid in self.states:
            raise DuplicateRequestId(f"Duplicate request ID detected: {rid}")
        if self.error is not None:
            raise RuntimeError(f"The engine runner failed: {self.error!r}")
        created = time.perf_counter() if received_wall is None else received_wall
        arrival = (created - self._start_wall) / self.time_scale
        req = EngineRequest(
            rid=rid,
            prompt_len=len(input_ids),
            block_hashes=tuple(token_block_hashes(input_ids, self.block_tokens, cache_salt)),
            block_tokens=self.block_tokens,
            max_new_tokens=max_new_tokens,
            arrival_s=arrival,
            stop_after=stop_at[0] if stop_at is not None else None,
        )
        self.engine.add(req, arrival)
        state = RequestState(rid=rid, prompt_tokens=len(input_ids), stop_at=stop_at,
                             log_metrics=log_metrics, created_wall=created, arrival_emu=arrival)
        self.states[rid] = state
        self._latest_arrival = max(self._latest_arrival, arrival)
        self._wake.set()
        return state

    def abort(self, rid: str, message: str = "The request was aborted.") -> bool:
        """Abort a request in flight (client went away, or /abort_request); False if unknown."""
        state = self.states.get(rid)
        if state is None:
            return False
        self.engine.abort(rid)
        self._finish(state, {"type": "abort", "message": message}, time.perf_counter(), self.emu_now())
        if state.log_metrics:
            self.metrics.on_abort()
        self._wake.set()
        return True

    # ---- the stepping loop ------------------------------------------------------------------

    async def _run(self) -> None:
        idle_steps = 0
        try:
            while True:
                if not self.engine.has_work():
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                now = max(self._clock, self._latest_arrival)
                self.lag_s = max(0.0, self.emu_now() - now)
                self.max_lag_s = max(self.max_lag_s, self.lag_s)
                outcome = self.engine.step(now)
                if outcome.iterations == 0 and outcome.duration_s <= 0.0:
                    # An idle iteration (SGLang resets its batch state in one) takes no time: step again at
                    # once. If the engine still cannot start anything, wait for an arrival or an abort,
                    # looking again now and then rather than trusting that one will come.
                    self._clock = now
                    self._deliver(outcome, now)
                    idle_steps += 1
                    if idle_steps >= 2:
                        idle_steps = 0
                        self._wake.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._wake.wait(), IDLE_RECHECK_S)
                    continue
                idle_steps = 0
                end = now + outcome.duration_s
                self._clock = end
                self.steps += 1
                await self._sleep_until(self.wall_at(end))
                self._deliver(outcome, end)
                if logger.isEnabledFor(logging.INFO):
                    self._log_step(outcome)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine model failed: fail loudly, answer what is in flight
            logger.exception("engine runner failed")
            self.error = exc
            for state in list(self.states.values()):
                self._finish(state, {"type": "abort", "message": f"Internal engine error: {exc}",
                                     "status_code": 500, "err_type": "InternalServerError"},
                             time.perf_counter(), self.emu_now())

    async def _sleep_until(self, wall: float) -> None:
        """Sleep until `wall`, aiming early by how late the event loop has been waking us (an average
        of recent wake-ups), so that deliveries are on time on average rather than always late."""
        target = wall - self._wake_lateness
        delay = target - time.perf_counter()
        if delay <= 0.0:
            await asyncio.sleep(0)  # behind: deliver now, but let the handlers run first
            return
        await asyncio.sleep(delay)
        late = min(max(time.perf_counter() - target, 0.0), MAX_LATENESS_S)
        self._wake_lateness += LATENESS_WEIGHT * (late - self._wake_lateness)

    def _log_step(self, outcome: StepOutcome) -> None:
        """SGLang's batch log lines: every prefill batch, and every decode_log_interval decode iterations."""
        if outcome.kind == "decode":
            self._decode_iterations += outcome.iterations
            if self._decode_iterations < self.engine.cfg.decode_log_interval:
                return
            self._decode_iterations = 0
            load = self.engine.load()
            logger.info("Decode batch. #running-req: %d, #token: %d, token usage: %.2f, gen throughput (token/s): "
                        "%.2f, #queue-req: %d", load.running, load.used_kv_tokens, load.token_usage,
                        load.gen_throughput, load.waiting)
        elif outcome.kind in ("prefill", "mixed"):
            load = self.engine.load()
            logger.info("Prefill batch. #new-seq: %d, #new-token: %d, #cached-token: %d, token usage: %.2f, "
                        "#running-req: %d, #queue-req: %d", len(outcome.first_tokens), outcome.prefill_tokens,
                        sum(ft.cached_tokens for ft in outcome.first_tokens), load.token_usage, load.running,
                        load.waiting)

    def _deliver(self, outcome: StepOutcome, end_emu: float) -> None:
        wall = time.perf_counter()
        states = self.states
        metrics = self.metrics
        for ft in outcome.first_tokens:
            state = states.get(ft.rid)
            if state is not None and state.first_token_wall is None:
                state.first_token_wall = wall
                state.first_token_emu = end_emu
                state.last_token_wall = wall
                state.cached_tokens = ft.cached_tokens
                if state.log_metrics:
                    metrics.on_first_token(wall - state.created_wall)
        tokens = outcome.tokens
        if outcome.first_tokens:
            # Wake the handlers of first tokens first: a step's chunks go out one after another, and
            # a first token queued behind a batch of decode chunks would show as a longer TTFT.
            firsts = {ft.rid: tokens[ft.rid] for ft in outcome.first_tokens if ft.rid in tokens}
            tokens = {**firsts, **{rid: n for rid, n in tokens.items() if rid not in firsts}}
        for rid, n in tokens.items():
            state = states.get(rid)
            if state is None or n <= 0:
                continue
            previous = state.completion_tokens
            state.completion_tokens = previous + n
            if previous > 0 and state.log_metrics and state.last_token_wall is not None:
                metrics.on_decode(wall - state.last_token_wall, n)
            state.last_token_wall = wall
            state.notify()
        for rid in outcome.retracted:
            state = states.get(rid)
            if state is not None:
                state.retractions += 1
        for fin in outcome.finished:
            state = states.get(fin.rid)
            if state is None:
                continue
            state.completion_tokens = fin.completion_tokens
            state.cached_tokens = fin.cached_tokens
            self._finish(state, self._finish_reason(state, fin.reason), wall, end_emu)
            if state.log_metrics:
                metrics.on_finish(fin.prompt_tokens, fin.completion_tokens, fin.cached_tokens,
                                  wall - state.created_wall)

    @staticmethod
    def _finish_reason(state: RequestState, engine_reason: str) -> dict[str, Any]:
        """SGLang's finish_reason JSON for how the engine ended a request."""
        if engine_reason == "stop" and state.stop_at is not None:
            return {"type": "stop", "matched": state.stop_at[1]}
        if engine_reason == "length":
            return {"type": "length", "length": state.completion_tokens}
        if engine_reason == "abort":
            return {"type": "abort", "message": "The request was aborted by the engine."}
        return {"type": engine_reason}

    def _finish(self, state: RequestState, reason: dict[str, Any], wall: float, emu: float) -> None:
        state.finish_reason = reason
        state.finished_wall = wall
        state.finished_emu = emu
        self.states.pop(state.rid, None)
        state.notify()
