"""Load a workload file into a seeded request stream plus the cluster events it schedules."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lodestar.settings import Settings
from sim.workloads.multi_turn import multi_turn_requests
from sim.workloads.request import WorkloadRequest
from sim.workloads.shared_prefix import shared_prefix_requests
from sim.workloads.spec import (
    AzureSpec,
    MooncakeSpec,
    MultiTurnSpec,
    SharedPrefixSpec,
    Slowdown,
    read_workload_spec,
)
from sim.workloads.traces import azure_requests, mooncake_requests, resolve_trace_path

AnySpec = MooncakeSpec | AzureSpec | SharedPrefixSpec | MultiTurnSpec


@dataclass(frozen=True)
class Workload:
    """A validated workload: `requests(seed)` gives the same stream for the same seed, every time."""

    spec: AnySpec
    trace_path: Path | None = None

    @property
    def name(self) -> str:
        return self.spec.name or self.spec.kind

    @property
    def duration_s(self) -> float | None:
        return self.spec.duration_s

    @property
    def slowdowns(self) -> list[Slowdown]:
        """Scheduled worker slowdowns, for the simulator to apply."""
        return self.spec.slowdowns()

    def with_duration(self, duration_s: float | None) -> Workload:
        """The same workload cut at `duration_s` (None keeps the file's setting)."""
        if duration_s is None:
            return self
        return Workload(self.spec.model_copy(update={"duration_s": duration_s}), self.trace_path)

    def with_rate(self, rate: float | None) -> Workload:
        """The same workload at another arrival rate (sessions/s for multi-turn); None keeps the file's.

        Trace replays switch to Poisson re-timing; scheduled rate changes stay as written.
        """
        if rate is None:
            return self
        key = "session_rate" if isinstance(self.spec, MultiTurnSpec) else "rate"
        update: dict[str, object] = {key: rate}
        if isinstance(self.spec, MooncakeSpec | AzureSpec):
            update["multiplier"] = 1.0
        return Workload(self.spec.model_copy(update=update), self.trace_path)

    def requests(self, seed: int) -> Iterator[WorkloadRequest]:
        """Requests in arrival order."""
        spec = self.spec
        if isinstance(spec, MooncakeSpec):
            assert self.trace_path is not None
            return mooncake_requests(spec, self.trace_path, seed)
        if isinstance(spec, AzureSpec):
            assert self.trace_path is not None
            return azure_requests(spec, self.trace_path, seed)
        if isinstance(spec, SharedPrefixSpec):
            return shared_prefix_requests(spec, seed)
        return multi_turn_requests(spec, seed)


def workload_from_spec(spec: AnySpec, data_dir: Path | None = None) -> Workload:
    """Bind a spec to its data; a trace replay fails here, with directions, if its file is missing."""
    if isinstance(spec, MooncakeSpec | AzureSpec):
        root = data_dir if data_dir is not None else Settings().data_dir
        return Workload(spec, resolve_trace_path(spec.path, root, spec.kind))
    return Workload(spec)


def load_workload(path: str | Path, data_dir: Path | None = None) -> Workload:
    """Read `configs/workloads/<name>.yaml` (or any path) into a Workload."""
    return workload_from_spec(read_workload_spec(path), data_dir)
