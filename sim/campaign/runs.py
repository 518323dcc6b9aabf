"""The campaign's runs: each made as `lodestar bench sim` makes it (sim.bench.simulate), `jobs` at a time, and
kept on disk so an interrupted or extended campaign reuses what it has.

A run is stored as `<out>/<scenario slug>/runs/<label>-s<seed>.json` (its results row, the learner's
snapshot log, what it is: cluster, workload, rate, duration, policy, parameters, seed, and the source it
was made from) beside `.npz` series (per request, in arrival order: arrival time, TTFT, routing kind). It
is reused only while both what it is and the source digest are unchanged. The digest covers the code and
configs a simulation reads (CODE_PATHS) as committed plus their uncommitted diff, and leaves out the
campaign's own post-processing (POST_PROCESSING: the matrix file, its validation, the statistics and the
write-up), so adding a scenario or changing a table reuses every run already made.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import subprocess
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lodestar.settings import PROJECT_ROOT
from sim import bench
from sim.campaign.matrix import Scenario
from sim.cluster import read_cluster
from sim.policy_factory import LEARNED, ORACLE, PolicySpec, learned_families
from sim.workloads import load_workload

# What a simulation's numbers depend on, and what of it does not change them.
CODE_PATHS: tuple[str, ...] = ("lodestar", "dispatcher", "learner", "sim", "configs", "pyproject.toml")
POST_PROCESSING: tuple[str, ...] = ("configs/campaign*.yaml", "sim/campaign/matrix.py", "sim/campaign/stats.py",
                                    "sim/campaign/aggregate.py", "sim/campaign/criteria.py",
                                    "sim/campaign_report.py")

# Routing kinds recorded per request.
HEURISTIC, MODEL, EXPLORED, FALLBACK = 0, 1, 2, 3


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, check=True).stdout


def counts_for_cache(path: str) -> bool:
    """Whether a change to `path` (relative to the project root) changes what a simulation computes."""
    return not any(fnmatch.fnmatchcase(path, pattern) for pattern in POST_PROCESSING)


def source_id() -> dict[str, str]:
    """The commit the numbers come from, the files changed but not committed, and `code`: a digest of the
    committed files of CODE_PATHS plus their uncommitted diff, POST_PROCESSING left out (the key under which
    runs are cached)."""
    committed = [line for line in _git("ls-tree", "-r", "HEAD", "--", *CODE_PATHS).splitlines()
                 if counts_for_cache(line.partition("\t")[2])]
    exclude = [f":(exclude,glob){p}" for p in POST_PROCESSING]
    diff = _git("diff", "HEAD", "--", *CODE_PATHS, *exclude)
    dirty = sorted(line[3:] for line in _git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS,
                                             *exclude).splitlines())
    return {"commit": _git("rev-parse", "HEAD").strip(),
            "code": hashlib.sha1(("\n".join(committed) + diff).encode()).hexdigest(),
            "dirty_files": ", ".join(dirty)}


@dataclass(frozen=True, slots=True)
class RunKey:
    """One simulation: a scenario's policy (by label) under one seed."""

    scenario: Scenario
    label: str
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.label}-s{self.seed}"


def run_keys(scenarios: Sequence[Scenario]) -> list[RunKey]:
    """Every run the scenarios need."""
    return [RunKey(sc, label, seed) for sc in scenarios for label, seed in sc.runs]


def describe(key: RunKey, spec: PolicySpec) -> dict[str, Any]:
    """What a run is, as stored beside it (JSON-normal, so a stored one compares equal)."""
    sc = key.scenario
    return json.loads(json.dumps({
        "cluster": sc.cluster, "workload": sc.workload, "rate": sc.rate, "duration_s": sc.duration_s,
        "label": spec.label, "policy": spec.policy, "params": dict(spec.params), "seed": key.seed}))


def expected_cost(key: RunKey, spec: PolicySpec) -> float:
    """A rough relative cost, to start the longest runs first."""
    per_request = 20.0 if spec.policy == ORACLE else 2.0 if spec.policy in learned_families() else 1.0
    return per_request * key.scenario.rate * key.scenario.duration_s


def simulate(cluster_path: str, workload_path: str, rate: float, duration_s: float, spec: PolicySpec,
             seed: int) -> dict[str, Any]:
    """One run as `lodestar bench sim` makes it; the results row, per-request series and learner snapshots."""
    cluster = read_cluster(cluster_path)
    workload = load_workload(workload_path).with_duration(duration_s).with_rate(rate)
    run = bench.simulate(cluster, workload, spec, seed)
    records = sorted(run.result.records, key=lambda r: r.arrival_s)

    def kind(decision: Any) -> int:
        if decision.fallback:
            return FALLBACK
        if decision.policy != LEARNED:
            return HEURISTIC
        return EXPLORED if decision.explored else MODEL

    return {
        "row": run.row,
        "arrival_s": np.array([r.arrival_s for r in records]),
        "ttft_s": np.array([r.ttft_s for r in records]),
        "kind": np.array([kind(r.decision) for r in records], dtype=np.int8),
        "snapshots": list(getattr(run.setup.sink, "snapshots", [])),
    }


@dataclass(slots=True)
class RunData:
    """A finished run as stored: its row, per-request series and learner snapshot log."""

    row: dict[str, Any]
    arrival_s: np.ndarray
    ttft_s: np.ndarray
    kind: np.ndarray
    snapshots: list[dict[str, Any]] = field(default_factory=list)


def _run_paths(out: Path, key: RunKey) -> tuple[Path, Path]:
    folder = out / key.scenario.slug / "runs"
    return folder / f"{key.stem}.json", folder / f"{key.stem}.npz"


def load_run(out: Path, key: RunKey, run: Mapping[str, Any], source: Mapping[str, str]) -> RunData | None:
    """The stored run of `key` if it is the run described by `run`, made from the same source; else None."""
    meta_path, series_path = _run_paths(out, key)
    if not (meta_path.exists() and series_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("run") != run or meta.get("source", {}).get("code") != source["code"]:
        return None
    with np.load(series_path) as series:
        return RunData(meta["row"], series["arrival_s"], series["ttft_s"], series["kind"], meta["snapshots"])


def save_run(out: Path, key: RunKey, run: Mapping[str, Any], source: Mapping[str, str],
             result: Mapping[str, Any]) -> RunData:
    """Store one run's row and series; returns it as RunData."""
    meta_path, series_path = _run_paths(out, key)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(series_path, arrival_s=result["arrival_s"], ttft_s=result["ttft_s"], kind=result["kind"])
    meta_path.write_text(json.dumps({"run": dict(run), "source": dict(source), "row": result["row"],
                                     "snapshots": result["snapshots"]}, indent=1))
    return RunData(result["row"], result["arrival_s"], result["ttft_s"], result["kind"], result["snapshots"])


def run_campaign(scenarios: Sequence[Scenario], specs: Mapping[str, PolicySpec], out: Path, jobs: int,
                 source: Mapping[str, str]) -> tuple[dict[RunKey, RunData], int]:
    """Run (or reuse) every run, `jobs` at a time, longest first; print progress as runs finish.

    Returns every run and how many were simulated now."""
    keys = run_keys(scenarios)
    runs: dict[RunKey, RunData] = {}
    todo = []
    for key in keys:
        stored = load_run(out, key, describe(key, specs[key.label]), source)
        if stored is None:
            todo.append(key)
        else:
            runs[key] = stored
    print(f"{len(keys)} runs: {len(runs)} reused, {len(todo)} to simulate with {jobs} processes", flush=True)
    t0 = time.perf_counter()
    todo.sort(key=lambda k: expected_cost(k, specs[k.label]), reverse=True)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(simulate, str(k.scenario.cluster_path), str(k.scenario.workload_path),
                               k.scenario.rate, k.scenario.duration_s, specs[k.label], k.seed): k for k in todo}
        for done, future in enumerate(as_completed(futures), 1):
            key = futures[future]
            runs[key] = save_run(out, key, describe(key, specs[key.label]), source, future.result())
            row = runs[key].row
            print(f"[{done}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {key.scenario.slug} {key.stem}: "
                  f"{row['completed']} req, TTFT mean {row['ttft_mean_ms']:.1f} ms, p99 {row['ttft_p99_ms']:.0f} ms, "
                  f"{row['wall_s']:.1f}s wall", flush=True)
    return runs, len(todo)


def campaign_wall_s(out: Path, source: Mapping[str, str], wall_s: float, simulated: int) -> tuple[float, int]:
    """Wall time spent simulating this campaign's runs, summed over the invocations that simulated any with
    the same code (recorded in <out>/campaign.json), and how many invocations that took."""
    record = out / "campaign.json"
    total, invocations = 0.0, 0
    if record.exists():
        stored = json.loads(record.read_text())
        if stored.get("code") == source["code"]:
            total, invocations = float(stored["wall_s"]), int(stored["invocations"])
    if simulated:
        total, invocations = total + wall_s, invocations + 1
        out.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"code": source["code"], "wall_s": total, "invocations": invocations}))
    return total, invocations
