"""A routing benchmark: every policy x seed on one cluster and one workload, with identical arrivals."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.cluster import ClusterSpec
from sim.metrics import summarize
from sim.policy_factory import PolicySetup, PolicySpec, build_sim_policy
from sim.simulator import SimResult, Simulator
from sim.workloads import Workload


@dataclass(slots=True)
class RunOutcome:
    """One (policy, seed) run: its results row and the per-request series the plots need."""

    row: dict[str, Any]
    arrival_s: np.ndarray
    ttft_s: np.ndarray


def result_row(result: SimResult, *, policy: str, seed: int, cluster: str, workload: str) -> dict[str, Any]:
    """The results.json object of one run: identification, bench_serving metrics, simulator speed."""
    row: dict[str, Any] = {"policy": policy, "seed": seed, "cluster": cluster, "workload": workload}
    row.update(summarize(result.records, result.itl_s, result.itl_tokens, result.routed_gpu_types,
                         result.gpu_types, failed=result.failed))
    row["retracted"] = result.retracted
    row["wall_s"] = result.wall_s
    row["sim_requests_per_wall_s"] = result.arrivals / result.wall_s if result.wall_s > 0 else 0.0
    return row


@dataclass(slots=True)
class SimRun:
    """One (policy, seed) simulation as it ended: its results row, the simulator's result (every completed
    request with its routing decision) and the policy it ran with its telemetry sink (a learner's log)."""

    row: dict[str, Any]
    result: SimResult
    setup: PolicySetup


def simulate(cluster: ClusterSpec, workload: Workload, spec: PolicySpec, seed: int, *,
             refresh_interval_s: float = 0.1, progress: Callable[[float], None] | None = None) -> SimRun:
    """Simulate `workload` (stream seeded by `seed`) on `cluster` under the policy of `spec`: the one way a
    run is made, by `lodestar bench sim` and by the results campaign alike."""
    setup = build_sim_policy(spec, seed=seed)
    sim = Simulator(cluster, setup.policy, seed=seed, refresh_interval_s=refresh_interval_s, sink=setup.sink)
    result = sim.run(workload.requests(seed), workload.slowdowns, progress=progress)
    row = result_row(result, policy=spec.label, seed=seed, cluster=cluster.name, workload=workload.name)
    return SimRun(row, result, setup)


def run_one(cluster: ClusterSpec, workload: Workload, spec: PolicySpec, seed: int, *,
            refresh_interval_s: float = 0.1, progress: Callable[[float], None] | None = None) -> RunOutcome:
    """`simulate`, keeping only the results row and the per-request series the bench's plots need."""
    run = simulate(cluster, workload, spec, seed, refresh_interval_s=refresh_interval_s, progress=progress)
    records = run.result.records
    arrival = np.fromiter((r.arrival_s for r in records), np.float64, len(records))
    ttft = np.fromiter((r.ttft_s for r in records), np.float64, len(records))
    return RunOutcome(run.row, arrival, ttft)


def run_benchmark(cluster: ClusterSpec, workload: Workload, specs: Sequence[PolicySpec], seeds: Sequence[int], *,
                  refresh_interval_s: float = 0.1,
                  on_run: Callable[[str, int], Callable[[float], None] | None] | None = None) -> list[RunOutcome]:
    """Every policy under every seed. `on_run(label, seed)` may return a progress callback for that run."""
    outcomes = []
    for spec in specs:
        for seed in seeds:
            progress = on_run(spec.label, seed) if on_run is not None else None
            outcomes.append(run_one(cluster, workload, spec, seed, refresh_interval_s=refresh_interval_s,
                                    progress=progress))
    return outcomes
