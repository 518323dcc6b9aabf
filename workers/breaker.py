"""A worker's circuit breaker on its engine, and the guard every generation goes through.

`CircuitBreaker` is the state machine, one per worker:

- **closed**: the engine serves; each generation that fails for the engine's reasons (unavailable after
  retries, a 5xx, timed out, a stream that broke: `counts_against_engine`) adds to a run of consecutive
  failures, a success ends the run. `failure_threshold` failures in a row, or `trip()` (the engine has not
  answered a load poll for longer than the state TTL), **open** it: the engine is declared dead.
- **open**: the worker is not routable. `supervise` then runs the worker's `on_dead` (stop advertising the
  worker, abandon the in-flight requests so their leases are released and their records stay uncommitted for
  a takeover or a redelivery, leave the consumer group) and waits `cooldown_s`.
- **half-open**: one probe generation (`probe`); a success **closes** the breaker and runs `on_alive`
  (rejoin the group, advertise again), a failure opens it for another cooldown.

`EngineGuard.run` wraps one generation: it waits while the breaker is not closed, bounds the whole
generation (every retry included) by `generation_timeout_s` and by the request's own `deadline_ms`, and
feeds the outcome to the breaker. A request cut by its own deadline, or refused for its input, says nothing
about the engine and does not count.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from enum import Enum
from typing import TypeVar

from lodestar.schemas import InferenceRequest, now_ms
from workers.retry import RETRYABLE_STATUS
from workers.sglang_client import EngineError, EngineRejected

log = logging.getLogger(__name__)

T = TypeVar("T")


class BreakerState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


def counts_against_engine(exc: EngineError) -> bool:
    """Whether a failed generation says the engine is failing: not when the input was refused, nor for a
    client-side status (4xx but 408/429: e.g. an unauthorized key, a client abort)."""
    if isinstance(exc, EngineRejected):
        return False
    status = exc.status
    return status is None or status >= 500 or status in RETRYABLE_STATUS


class CircuitBreaker:
    """Consecutive engine failures open it; after `cooldown_s` one probe may run (half-open); its success
    closes it. `opened` and `closed` are set while the breaker is in that state (for waiters)."""

    def __init__(self, failure_threshold: int, cooldown_s: float, clock: Callable[[], float] = time.monotonic,
                 on_change: Callable[[BreakerState], None] | None = None):
        self.failure_threshold = failure_threshold
        self._on_change = on_change  # told every state it enters (the worker's metrics)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self.state = BreakerState.CLOSED
        self.failures = 0  # consecutive, while closed
        self.opened_at = 0.0
        self.reason = ""
        self.times_opened = 0
        self.opened = asyncio.Event()
        self.closed = asyncio.Event()
        self.closed.set()

    @property
    def routable(self) -> bool:
        """Whether the worker may take requests: only while closed."""
        return self.state is BreakerState.CLOSED

    def record_success(self) -> None:
        """A generation (or the half-open probe) succeeded."""
        self.failures = 0
        if self.state is not BreakerState.CLOSED:
            log.info("circuit breaker closed: the engine answers again")
            self._enter(BreakerState.CLOSED)
            self.opened.clear()
            self.closed.set()

    def record_failure(self, reason: str) -> None:
        """A generation failed for the engine's reasons; the threshold-th in a row (or a failed probe) opens."""
        if self.state is BreakerState.HALF_OPEN:
            self._open(f"probe failed: {reason}")
        elif self.state is BreakerState.CLOSED:
            self.failures += 1
            if self.failures >= self.failure_threshold:
                self._open(f"{self.failures} consecutive engine failures, the last: {reason}")

    def trip(self, reason: str) -> None:
        """Declare the engine dead now (e.g. it stopped answering load polls)."""
        if self.state is BreakerState.CLOSED:
            self._open(reason)

    def _open(self, reason: str) -> None:
        log.warning("circuit breaker open: %s", reason)
        self._enter(BreakerState.OPEN)
        self.reason = reason
        self.opened_at = self._clock()
        self.times_opened += 1
        self.failures = 0
        self.closed.clear()
        self.opened.set()

    def cooldown_left(self) -> float:
        """Seconds until a probe may run (0 when not open)."""
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(self.opened_at + self.cooldown_s - self._clock(), 0.0)

    def begin_probe(self) -> None:
        """Open -> half-open once the cooldown has passed."""
        if self.state is BreakerState.OPEN and self.cooldown_left() <= 0.0:
            self._enter(BreakerState.HALF_OPEN)

    def _enter(self, state: BreakerState) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state)


class EngineGuard:
    """Every generation goes through `run`: only while the breaker is closed, within a total deadline."""

    def __init__(self, breaker: CircuitBreaker, generation_timeout_s: float,
                 wall_ms: Callable[[], float] = now_ms):
        self.breaker = breaker
        self.generation_timeout_s = generation_timeout_s
        self._wall_ms = wall_ms

    async def run(self, request: InferenceRequest, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` (one generation, its retries included) bounded by generation_timeout_s and the request's
        deadline_ms; EngineError when it runs out of either. Waits while the breaker is not closed (the worker
        is then abandoning its in-flight requests to redelivery)."""
        await self.breaker.closed.wait()
        timeout_s, own_deadline = self.generation_timeout_s, False
        if request.deadline_ms is not None:
            left_s = (request.deadline_ms - self._wall_ms()) / 1000.0
            if left_s < timeout_s:
                timeout_s, own_deadline = max(left_s, 0.0), True
        try:
            async with asyncio.timeout(timeout_s):
                result = await call()
        except TimeoutError:
            if own_deadline:
                raise EngineError(f"deadline exceeded during generation: deadline_ms {request.deadline_ms:.0f} "
                                  "passed before the engine finished", 504) from None
            reason = f"the generation took longer than worker.generation_timeout_s={self.generation_timeout_s:g} s"
            self.breaker.record_failure(reason)
            raise EngineError(reason, 504) from None
        except EngineError as exc:
            if counts_against_engine(exc):
                self.breaker.record_failure(str(exc)[:300])
            raise
        self.breaker.record_success()
        return result


async def supervise(breaker: CircuitBreaker, *, probe: Callable[[], Awaitable[object]], probe_timeout_s: float,
                    on_dead: Callable[[], Awaitable[None]], on_alive: Callable[[], Awaitable[None]],
                    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Run for ever: each time the breaker opens, `on_dead()`, then probe after every cooldown until a probe
    succeeds, then `on_alive()`."""
    while True:
        await breaker.opened.wait()
        await on_dead()
        while not breaker.routable:
            await sleep(breaker.cooldown_left())
            breaker.begin_probe()
            try:
                async with asyncio.timeout(probe_timeout_s):
                    await probe()
            except (EngineError, TimeoutError) as exc:
                breaker.record_failure(str(exc)[:300] or "the probe timed out")
                continue
            breaker.record_success()
        await on_alive()
