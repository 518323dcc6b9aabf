"""The policy interface: what every routing policy is, and nothing about which policies exist.

A policy is a class in a module of this package (`dispatcher.policies.registry` finds it there) with a
`name` and a `choose` method. Its constructor takes the run's `seed` and declares its tunable parameters
with their bounds and meaning (`Annotated[float, Field(ge=0, description=...)] = default`), which settings
and the command line are validated against (lodestar/params.py) and docs/policies.md is generated from.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.snapshot import Snapshot


@runtime_checkable
class Policy(Protocol):
    """Chooses a worker for a request from what a router can see. No I/O, no waiting."""

    name: str

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """Pick one of `view`'s workers for `request`."""
        ...


@runtime_checkable
class SnapshotPolicy(Protocol):
    """A policy that evaluates a model snapshot (the `learned` policy): it follows the learner, and routes with
    a fallback heuristic while it has no usable model."""

    def fallback_name(self) -> str:
        """The name of the heuristic that routes while there is no usable model."""
        ...

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Swap in a new model; raises SnapshotError if it cannot be evaluated."""
        ...
