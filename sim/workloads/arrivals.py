"""Arrival times: a Poisson (or gamma-bursty) process whose rate can change at scheduled times."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sim.workloads.spec import RateChange


class ArrivalProcess:
    """Successive arrival times at `rate` per second, switching rate at each `RateChange`.

    `burstiness` is the shape of the gamma inter-arrival distribution, as in vLLM's and SGLang's
    benchmarks: 1.0 is Poisson, below 1 burstier, above 1 smoother; the mean rate is unchanged. At a
    rate change the process restarts at the change time (exact for Poisson, which is memoryless).
    """

    def __init__(self, rate: float, rng: np.random.Generator, changes: Sequence[RateChange] = (),
                 burstiness: float = 1.0, start_s: float = 0.0):
        self._rate = rate
        self._rng = rng
        self._changes = sorted(changes, key=lambda c: c.at_s)
        self._next_change = 0
        self._shape = burstiness
        self._t = start_s

    def next(self) -> float:
        """The next arrival time in seconds."""
        while True:
            gap = self._rng.gamma(self._shape, 1.0 / (self._rate * self._shape))
            candidate = self._t + gap
            if self._next_change < len(self._changes) and candidate >= self._changes[self._next_change].at_s:
                change = self._changes[self._next_change]
                self._next_change += 1
                self._t = max(self._t, change.at_s)
                self._rate = change.rate
                continue
            self._t = candidate
            return candidate
