"""The simulator's telemetry hook: where a learner observes completions and publishes its snapshots.

The simulator calls `observe(record)` for every completed request, in virtual-time order, and
`tick(now_s)` before every event it processes (arrival or engine step), so a snapshot published at
`tick(t)` routes the arrivals at t. A learner publishes at its own cadence in virtual time, as the live
learner does in wall-clock time, by loading the snapshot into the policy it trains (sim/learning_loop.py).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from sim.records import CompletedRequest


@runtime_checkable
class TelemetrySink(Protocol):
    """Receives completions and the passing of virtual time."""

    def observe(self, record: CompletedRequest) -> None:
        """One completed request: its decision (with features) and observed TTFT/TPOT/E2E."""
        ...

    def tick(self, now_s: float) -> None:
        """Virtual time has reached `now_s` (a learner may publish a snapshot into its policy now)."""
        ...
