"""The simulator's telemetry hook: where a learner observes completions and publishes new policies.

The simulator calls `observe(record)` for every completed request, in virtual-time order, and
`tick(now_s)` before every event it processes (arrival or engine step), so a policy returned by
`tick(t)` routes the arrivals at t. `tick` returns a policy to route
with from now on (e.g. the learned policy with a fresh snapshot) or None to keep the current one, so a
learner publishes at its own cadence in virtual time, as the live learner does in wall-clock time.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from dispatcher.policies.base import Policy
from sim.records import CompletedRequest


@runtime_checkable
class TelemetrySink(Protocol):
    """Receives completions; may swap in a new policy."""

    def observe(self, record: CompletedRequest) -> None:
        """One completed request: its decision (with features) and observed TTFT/TPOT/E2E."""
        ...

    def tick(self, now_s: float) -> Policy | None:
        """Virtual time has reached `now_s`; return a replacement policy, or None."""
        ...
