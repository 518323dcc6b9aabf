"""How a worker retries a failed engine call: which failures, how long to wait, and how many retries at most.

- **Which**: HTTP 408 (request timeout), 429 (too many requests), 500, 502, 503, 504 and connection
  failures (`RETRYABLE_STATUS`; workers/sglang_client.py maps them to EngineUnavailable). A refused input
  (400/413/422) never is.
- **How long**: exponential backoff from `backoff_s`, doubling up to `max_backoff_s`, each delay drawn
  uniformly from [(1 - jitter) * d, d] so that the requests an engine failed together do not come back
  together.
- **How many**: `attempts` retries per call, and a **retry budget** shared by every call of one worker
  (`RetryBudget`): retries may add at most `ratio` of the calls made recently (plus `min_retries` per
  window, so a quiet worker can still retry). An engine failing every call then gets ~1 + ratio attempts per
  request rather than 1 + attempts: retries cannot multiply the load on an engine that is already failing.

The per-generation deadline (the total time, retries included) and the circuit breaker are applied around
the call, by workers/breaker.py.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})


class RetryBudget:
    """Retries allowed as a fraction of recent calls: over the last `window_s`, retries <= min_retries +
    ratio * calls. Shared by all the calls of one worker."""

    def __init__(self, ratio: float, window_s: float = 10.0, min_retries: int = 10,
                 clock: Callable[[], float] = time.monotonic):
        self.ratio = ratio
        self.window_s = window_s
        self.min_retries = min_retries
        self._clock = clock
        self._calls: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        for q in (self._calls, self._retries):
            while q and q[0] <= now - self.window_s:
                q.popleft()

    def call(self) -> None:
        """A call (first attempt) was made."""
        now = self._clock()
        self._trim(now)
        self._calls.append(now)

    def try_retry(self) -> bool:
        """Take one retry from the budget; False when it is spent."""
        now = self._clock()
        self._trim(now)
        if len(self._retries) >= self.min_retries + self.ratio * len(self._calls):
            return False
        self._retries.append(now)
        return True


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded, jittered retries with exponential backoff: at most `attempts` retries after the first try, and
    only while the shared `budget` (if any) allows."""

    attempts: int
    backoff_s: float
    max_backoff_s: float = 5.0
    jitter: float = 0.5
    budget: RetryBudget | None = field(default=None, compare=False)
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delays(self) -> Iterator[float]:
        """The pause before each retry of one call (the call is counted in the budget now); ends when the
        attempts or the budget are spent."""
        if self.budget is not None:
            self.budget.call()
        return self._delays()

    def _delays(self) -> Iterator[float]:
        delay = self.backoff_s
        for _ in range(self.attempts):
            if self.budget is not None and not self.budget.try_retry():
                return
            yield delay * (1.0 - self.jitter * self.rng.random())
            delay = min(delay * 2.0, self.max_backoff_s)
