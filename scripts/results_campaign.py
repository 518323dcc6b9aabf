"""The measured evidence for learned routing: one command runs the whole simulator campaign and writes it up.

    .venv/bin/python scripts/results_campaign.py [--jobs 2] [--out .run/campaign] [--quick] [--no-doc]

Runs the scenario matrix below (every baseline and the `learned` policy under seeds 1-3, the greedy
oracle on seed 1, `learned_river` beside the default family on a few scenarios, two shift scenarios),
each run exactly as `lodestar bench sim` runs it (same policy builder, simulator and results row), in
`--jobs` processes. Per scenario it writes `<out>/<scenario>/results.json` and `results.md` in the
bench's format, and keeps every run (results row + per-request arrival, TTFT and routing kind) under
`<out>/<scenario>/runs/`, so an interrupted campaign resumes where it stopped (a run is reused only if
the simulator, policies, learner, core and configs are unchanged since it was made). Then it writes the learned-routing
sections of docs/results.md (between generated-region markers; hand-written text around them is kept)
and the plots in docs/img/. `--quick` is a smoke subset (two short scenarios, one seed) that writes
under `<out>-quick` and leaves the docs alone.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BASELINES: tuple[str, ...] = ("least_request", "sglang_cache_aware", "aibrix_prefix_load", "dynamo_kv_cost",
                              "llmd_weighted", "lmetric", "gpu_speed_queue")
LEARNED = "learned"
RIVER = "learned_river"
ORACLE = "oracle"
SEEDS: tuple[int, ...] = (1, 2, 3)
WINDOW_S = 30.0  # learning-curve window
TOLERANCE = 0.10  # "within 10% of steady state"
# Targets (issue 6).
HETERO_TARGET = 1.5
HOMO_TARGET = 1.1
FLOOR_TARGET = 0.97
SETTLE_TARGET_S = 300.0
ORACLE_TARGET = 1.15

# Routing kinds recorded per request.
HEURISTIC, MODEL, EXPLORED, FALLBACK = 0, 1, 2, 3


@dataclass(frozen=True, slots=True)
class Scenario:
    """One cluster x workload x rate; what to run on it and what to draw from it."""

    cluster: str  # file stem in configs/clusters
    workload: str  # file stem in configs/workloads
    rate: float
    duration_s: float = 300.0
    seeds: tuple[int, ...] = SEEDS
    baselines: tuple[str, ...] = BASELINES
    oracle: bool = True  # on the first seed only
    families: bool = False  # also learned_river, to compare model families
    curve: bool = False  # draw the cold-start learning curve
    shift_at_s: float | None = None  # an adaptation scenario: the workload's event time

    @property
    def slug(self) -> str:
        return f"{self.cluster}__{self.workload}__r{self.rate:g}"

    @property
    def cluster_path(self) -> Path:
        return ROOT / "configs" / "clusters" / f"{self.cluster}.yaml"

    @property
    def workload_path(self) -> Path:
        return ROOT / "configs" / "workloads" / f"{self.workload}.yaml"

    @property
    def policies(self) -> list[str]:
        """The policies run under every seed."""
        return [*self.baselines, LEARNED, *([RIVER] if self.families else [])]


# The oracle runs where it is affordable: its forward simulation of every candidate engine runs at
# 25-100 requests per wall second on this shared machine (a 12k-request run took 7 min; one on 8x H100
# had not finished after 14 min).
SHIFT_BASELINES: tuple[str, ...] = ("sglang_cache_aware", "lmetric", "gpu_speed_queue")
MATRIX: tuple[Scenario, ...] = (
    Scenario("hetero_2h100_2a100_4l4", "mooncake_conversation", 25, families=True, curve=True),
    Scenario("hetero_2h100_2a100_4l4", "mooncake_conversation", 40),
    Scenario("hetero_2h100_2a100_4l4", "mooncake_synthetic", 14, oracle=False),
    Scenario("hetero_2h100_2a100_4l4", "shared_prefix", 20),
    Scenario("hetero_2h100_2a100_4l4", "multi_turn", 3, oracle=False),
    Scenario("hetero_2h100_2a100_4l4", "azure_conv", 30, oracle=False),
    Scenario("hetero_4a30_4v100", "mooncake_conversation", 14, families=True, oracle=False),
    Scenario("hetero_4a30_4v100", "shared_prefix", 12),
    Scenario("hetero_4a30_4v100", "azure_conv", 16, oracle=False),
    Scenario("homo_8a30", "mooncake_conversation", 16, families=True, curve=True),
    Scenario("homo_8a30", "shared_prefix", 12),
    Scenario("homo_8a30", "multi_turn", 3, oracle=False),
    Scenario("homo_8h100", "mooncake_conversation", 120, oracle=False),
    Scenario("homo_8h100", "shared_prefix", 30),
    Scenario("hetero_2h100_2a100_4l4", "shift_slowdown", 20, duration_s=600, baselines=SHIFT_BASELINES,
             oracle=False, shift_at_s=150),
    Scenario("homo_8a30", "shift_prefix_share", 16, duration_s=600, baselines=SHIFT_BASELINES, oracle=False,
             shift_at_s=150),
)
QUICK: tuple[Scenario, ...] = (
    Scenario("hetero_2h100_2a100_4l4", "mooncake_conversation", 25, duration_s=60, seeds=(1,),
             baselines=("lmetric", "gpu_speed_queue"), families=True, curve=True),
    Scenario("homo_8a30", "shift_prefix_share", 12, duration_s=90, seeds=(1,), baselines=("sglang_cache_aware",),
             oracle=False, shift_at_s=150),
)


# ---------------------------------------------------------------- pure aggregation (unit-tested) --


def seed_means(rows: Sequence[Mapping[str, Any]], policy: str, key: str) -> float:
    """Mean of `key` over the seeds `policy` ran (nan if it did not run)."""
    values = [float(r[key]) for r in rows if r["policy"] == policy]
    return float(np.mean(values)) if values else math.nan


def best_baseline(rows: Sequence[Mapping[str, Any]], baselines: Sequence[str]) -> str:
    """The baseline with the least mean TTFT, averaged over its seeds (ties: the first listed)."""
    present = [b for b in baselines if any(r["policy"] == b for r in rows)]
    if not present:
        raise ValueError("no baseline ran")
    return min(present, key=lambda b: seed_means(rows, b, "ttft_mean_ms"))


def per_seed_ratios(rows: Sequence[Mapping[str, Any]], policy: str, reference: str, key: str) -> list[float]:
    """reference / policy for `key`, per seed both ran (>1: `policy` is lower, i.e. better)."""
    ref = {r["seed"]: float(r[key]) for r in rows if r["policy"] == reference}
    out = []
    for r in sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["seed"]):
        if r["seed"] in ref:
            value = float(r[key])
            out.append(ref[r["seed"]] / value if value > 0 else math.inf)
    return out


@dataclass(frozen=True, slots=True)
class Comparison:
    """`policy` against the best baseline: mean and min over seeds of the TTFT ratios, and the oracle gap."""

    policy: str
    baseline: str
    mean_x: float
    mean_x_min: float
    p99_x: float
    p99_x_min: float
    oracle_gap: float | None  # policy mean TTFT / oracle mean TTFT, on the seed the oracle ran


def compare(rows: Sequence[Mapping[str, Any]], policy: str, baselines: Sequence[str],
            oracle: str = ORACLE) -> Comparison:
    """How `policy` does against the best of `baselines` (chosen by mean TTFT over seeds) and the oracle."""
    base = best_baseline(rows, baselines)
    mean_x = per_seed_ratios(rows, policy, base, "ttft_mean_ms")
    p99_x = per_seed_ratios(rows, policy, base, "ttft_p99_ms")
    if not mean_x:
        raise ValueError(f"{policy} and {base} share no seed")
    gaps = [1.0 / x for x in per_seed_ratios(rows, policy, oracle, "ttft_mean_ms") if x > 0]
    return Comparison(policy, base, float(np.mean(mean_x)), min(mean_x), float(np.mean(p99_x)), min(p99_x),
                      gaps[0] if gaps else None)


def window_means(arrival_s: np.ndarray, values: np.ndarray, start_s: float, end_s: float,
                 window_s: float) -> tuple[np.ndarray, np.ndarray]:
    """Window start times from `start_s` up to `end_s` and the mean of `values` whose arrival falls in each
    (nan for an empty window)."""
    starts = np.arange(start_s, end_s - 1e-9, window_s)
    which = np.floor((arrival_s - start_s) / window_s).astype(np.int64)
    keep = (which >= 0) & (which < len(starts))
    total = np.bincount(which[keep], weights=values[keep], minlength=len(starts))
    count = np.bincount(which[keep], minlength=len(starts))
    with np.errstate(invalid="ignore", divide="ignore"):
        return starts, np.where(count > 0, total / np.maximum(count, 1), np.nan)


@dataclass(frozen=True, slots=True)
class Settling:
    """A curve's steady state (mean over its last stretch) and when it came within tolerance of it for good."""

    steady: float
    settle_s: float | None  # seconds after the curve's start; None if it never stayed within tolerance


def _settled_after(starts: np.ndarray, curve: np.ndarray, steady: float, start_s: float,
                   tolerance: float) -> float | None:
    """Seconds from `start_s` to the first window from which `curve` stays within `tolerance` of `steady`
    (nan windows skipped); None if the last window is still off."""
    off = np.abs(curve / steady - 1.0) > tolerance  # nan compares False: skipped
    if not off.any():
        return 0.0
    last_off = int(np.flatnonzero(off)[-1])
    if last_off + 1 >= len(starts):
        return None
    return float(starts[last_off + 1] - start_s)


def _tail(arrival_s: np.ndarray, steady_from_s: float, end_s: float) -> np.ndarray:
    tail = (arrival_s >= steady_from_s) & (arrival_s < end_s)
    if not tail.any():
        raise ValueError("no sample in the steady-state stretch")
    return tail


def settle_time(arrival_s: np.ndarray, values: np.ndarray, *, start_s: float, steady_from_s: float, end_s: float,
                window_s: float = WINDOW_S, tolerance: float = TOLERANCE) -> Settling:
    """When the curve from `start_s` settles: the steady state is the mean over arrivals in
    [steady_from_s, end_s); the settle time is the start of the first `window_s` window (counted from
    `start_s`) from which every window's mean stays within `tolerance` of it, empty windows skipped."""
    if not start_s <= steady_from_s < end_s:
        raise ValueError("need start_s <= steady_from_s < end_s")
    steady = float(values[_tail(arrival_s, steady_from_s, end_s)].mean())
    starts, means = window_means(arrival_s, values, start_s, end_s, window_s)
    return Settling(steady, _settled_after(starts, means, steady, start_s, tolerance))


def ratio_settle_time(ref_arrival_s: np.ndarray, ref: np.ndarray, arrival_s: np.ndarray, values: np.ndarray, *,
                      start_s: float, steady_from_s: float, end_s: float, window_s: float = WINDOW_S,
                      tolerance: float = TOLERANCE) -> Settling:
    """`settle_time` of the paired curve mean(ref) / mean(values) per window (the x of `values` over `ref`
    on the same arrivals): what changes with the traffic moves both and cancels, learning does not."""
    if not start_s <= steady_from_s < end_s:
        raise ValueError("need start_s <= steady_from_s < end_s")
    steady = float(ref[_tail(ref_arrival_s, steady_from_s, end_s)].mean()
                   / values[_tail(arrival_s, steady_from_s, end_s)].mean())
    starts, ref_means = window_means(ref_arrival_s, ref, start_s, end_s, window_s)
    _, means = window_means(arrival_s, values, start_s, end_s, window_s)
    return Settling(steady, _settled_after(starts, ref_means / means, steady, start_s, tolerance))


def ratio_after(ref_arrival_s: np.ndarray, ref: np.ndarray, arrival_s: np.ndarray, values: np.ndarray,
                from_s: float) -> float:
    """mean(ref) / mean(values) over the requests of each arriving at or after `from_s` (nan if none)."""
    ref_after, after = ref[ref_arrival_s >= from_s], values[arrival_s >= from_s]
    if len(ref_after) == 0 or len(after) == 0:
        return math.nan
    return float(ref_after.mean() / after.mean())


# ---------------------------------------------------------------------------------------- running --


# What a simulation's numbers depend on: a run is reused only while these are unchanged.
CODE_PATHS: tuple[str, ...] = ("lodestar", "dispatcher", "learner", "sim", "configs", "pyproject.toml")


def source_id() -> dict[str, str]:
    """The commit the numbers come from, the files changed but not committed, and `code`: a digest of the
    committed trees of CODE_PATHS plus their uncommitted diff (the key under which runs are cached)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    trees = git("rev-parse", *(f"HEAD:{p}" for p in CODE_PATHS))
    diff = git("diff", "HEAD", "--", *CODE_PATHS)
    dirty = sorted(line[3:] for line in git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
                   .splitlines())
    return {"commit": git("rev-parse", "HEAD").strip(), "code": hashlib.sha1((trees + diff).encode()).hexdigest(),
            "dirty_files": ", ".join(dirty)}


@dataclass(frozen=True, slots=True)
class RunKey:
    """One simulation: a scenario's policy under one seed."""

    scenario: Scenario
    policy: str
    seed: int

    @property
    def stem(self) -> str:
        return f"{self.policy}-s{self.seed}"

    def expected_cost(self) -> float:
        """A rough relative cost, to start the longest runs first."""
        per_request = {ORACLE: 20.0, LEARNED: 2.0, RIVER: 3.0}.get(self.policy, 1.0)
        return per_request * self.scenario.rate * self.scenario.duration_s


def simulate(cluster_path: str, workload_path: str, rate: float, duration_s: float, policy: str,
             seed: int) -> dict[str, Any]:
    """One run as `lodestar bench sim` makes it; the results row, per-request series and learner snapshots."""
    from sim.bench import result_row
    from sim.cluster import read_cluster
    from sim.policy_factory import PolicySpec, build_sim_policy
    from sim.simulator import Simulator
    from sim.workloads import load_workload

    cluster = read_cluster(cluster_path)
    workload = load_workload(workload_path).with_duration(duration_s).with_rate(rate)
    setup = build_sim_policy(PolicySpec.parse(policy), seed=seed)
    sim = Simulator(cluster, setup.policy, seed=seed, refresh_interval_s=0.1, sink=setup.sink)
    result = sim.run(workload.requests(seed), workload.slowdowns)
    row = result_row(result, policy=policy, seed=seed, cluster=cluster.name, workload=workload.name)
    records = sorted(result.records, key=lambda r: r.arrival_s)

    def kind(decision: Any) -> int:
        if decision.fallback:
            return FALLBACK
        if decision.policy != LEARNED:
            return HEURISTIC
        return EXPLORED if decision.explored else MODEL

    return {
        "row": row,
        "arrival_s": np.array([r.arrival_s for r in records]),
        "ttft_s": np.array([r.ttft_s for r in records]),
        "kind": np.array([kind(r.decision) for r in records], dtype=np.int8),
        "snapshots": list(getattr(setup.sink, "snapshots", [])),
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


def load_run(out: Path, key: RunKey, source: Mapping[str, str]) -> RunData | None:
    """A stored run of `key` made from the same source, or None."""
    meta_path, series_path = _run_paths(out, key)
    if not (meta_path.exists() and series_path.exists()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("source", {}).get("code") != source["code"]:
        return None
    with np.load(series_path) as series:
        return RunData(meta["row"], series["arrival_s"], series["ttft_s"], series["kind"], meta["snapshots"])


def save_run(out: Path, key: RunKey, source: Mapping[str, str], result: Mapping[str, Any]) -> RunData:
    """Store one run's row and series; returns it as RunData."""
    meta_path, series_path = _run_paths(out, key)
    meta_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(series_path, arrival_s=result["arrival_s"], ttft_s=result["ttft_s"], kind=result["kind"])
    meta_path.write_text(json.dumps({"source": dict(source), "row": result["row"],
                                     "snapshots": result["snapshots"]}, indent=1))
    return RunData(result["row"], result["arrival_s"], result["ttft_s"], result["kind"], result["snapshots"])


def run_keys(scenarios: Sequence[Scenario]) -> list[RunKey]:
    """Every run the campaign needs."""
    keys = []
    for sc in scenarios:
        keys += [RunKey(sc, p, s) for p in sc.policies for s in sc.seeds]
        if sc.oracle:
            keys.append(RunKey(sc, ORACLE, sc.seeds[0]))
    return keys


def run_campaign(scenarios: Sequence[Scenario], out: Path, jobs: int,
                 source: Mapping[str, str]) -> tuple[dict[RunKey, RunData], int]:
    """Run (or reuse) every run, `jobs` at a time, longest first; print progress as runs finish.

    Returns every run and how many were simulated now."""
    keys = run_keys(scenarios)
    runs: dict[RunKey, RunData] = {}
    todo = []
    for key in keys:
        stored = load_run(out, key, source)
        if stored is None:
            todo.append(key)
        else:
            runs[key] = stored
    print(f"{len(keys)} runs: {len(runs)} reused, {len(todo)} to simulate with {jobs} processes", flush=True)
    t0 = time.perf_counter()
    todo.sort(key=RunKey.expected_cost, reverse=True)
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(simulate, str(k.scenario.cluster_path), str(k.scenario.workload_path),
                               k.scenario.rate, k.scenario.duration_s, k.policy, k.seed): k for k in todo}
        for done, future in enumerate(as_completed(futures), 1):
            key = futures[future]
            runs[key] = save_run(out, key, source, future.result())
            row = runs[key].row
            print(f"[{done}/{len(todo)} {time.perf_counter() - t0:6.0f}s] {key.scenario.slug} {key.stem}: "
                  f"{row['completed']} req, TTFT mean {row['ttft_mean_ms']:.1f} ms, p99 {row['ttft_p99_ms']:.0f} ms, "
                  f"{row['wall_s']:.1f}s wall", flush=True)
    return runs, len(todo)


# ------------------------------------------------------------------------------------- reporting --


@dataclass(slots=True)
class ScenarioReport:
    """What the write-up needs about one scenario."""

    scenario: Scenario
    homogeneous: bool
    rows: list[dict[str, Any]]
    learned: Comparison
    river: Comparison | None
    model_share: float  # fraction of learned decisions the model made (not the fallback), over seeds
    first_validated_s: list[float]  # per seed: when the learner's first validated snapshot came out
    warm_x: float  # best baseline / learned mean TTFT on requests arriving after that, mean over seeds
    x_settling: Settling | None  # the paired x curve (best baseline / learned), from cold start or the shift
    settling: Settling | None  # learned's own TTFT curve, from cold start or the shift
    baseline_settling: Settling | None  # the best baseline's TTFT curve by the same rule: the noise floor
    requests: int
    span_s: float


def cluster_is_homogeneous(path: Path) -> bool:
    """One GPU type across the cluster file's workers."""
    from sim.cluster import read_cluster

    return len({w.gpu for w in read_cluster(path).expand()}) == 1


def seed_runs(runs: Mapping[RunKey, RunData], scenario: Scenario, policy: str) -> list[RunData]:
    """`policy`'s runs on `scenario`, by seed."""
    return [d for k, d in sorted(runs.items(), key=lambda kd: kd[0].seed)
            if k.scenario == scenario and k.policy == policy]


def pooled(runs: Mapping[RunKey, RunData], scenario: Scenario, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times and TTFTs (ms) of `policy` on `scenario`, all its seeds pooled."""
    chosen = seed_runs(runs, scenario, policy)
    return (np.concatenate([d.arrival_s for d in chosen]),
            np.concatenate([d.ttft_s for d in chosen]) * 1000.0)


def curve_span(scenario: Scenario, arrival_s: np.ndarray) -> tuple[float, float, float] | None:
    """(start, steady_from, end) of a settle computation: from cold start or the shift to the last arrival,
    the steady state over the last third; None if that is shorter than eight windows."""
    start = scenario.shift_at_s or 0.0
    end = float(min(scenario.duration_s, arrival_s.max()))
    if end - start < 8 * WINDOW_S:
        return None
    return start, start + (end - start) * 2 / 3, end


def scenario_report(runs: Mapping[RunKey, RunData], scenario: Scenario) -> ScenarioReport:
    """Aggregate one scenario's runs."""
    rows = [d.row for k, d in runs.items() if k.scenario == scenario]
    learned = compare(rows, LEARNED, scenario.baselines)
    river = compare(rows, RIVER, scenario.baselines) if scenario.families else None
    mine, base = seed_runs(runs, scenario, LEARNED), seed_runs(runs, scenario, learned.baseline)
    kinds = np.concatenate([d.kind for d in mine])
    validated = [next((s["at_s"] for s in d.snapshots if s["validated"]), math.nan) for d in mine]
    warm_x = float(np.nanmean([ratio_after(b.arrival_s, b.ttft_s, d.arrival_s, d.ttft_s, t)
                               for b, d, t in zip(base, mine, validated, strict=True)]))
    arrival, ttft = pooled(runs, scenario, LEARNED)
    base_arrival, base_ttft = pooled(runs, scenario, learned.baseline)
    span = curve_span(scenario, arrival)
    x_settling = settling = baseline_settling = None
    if span is not None:
        start, steady_from, end = span
        x_settling = ratio_settle_time(base_arrival, base_ttft, arrival, ttft, start_s=start,
                                       steady_from_s=steady_from, end_s=end)
        settling = settle_time(arrival, ttft, start_s=start, steady_from_s=steady_from, end_s=end)
        baseline_settling = settle_time(base_arrival, base_ttft, start_s=start, steady_from_s=steady_from, end_s=end)
    return ScenarioReport(
        scenario, cluster_is_homogeneous(scenario.cluster_path), rows, learned, river,
        float(np.mean(kinds != FALLBACK)), validated, warm_x, x_settling, settling, baseline_settling,
        int(np.mean([r["completed"] for r in rows if r["policy"] == LEARNED])), float(arrival.max()))


def bench_command(scenario: Scenario, policies: Sequence[str], seeds: Sequence[int], out_name: str) -> str:
    """The `lodestar bench sim` command that reproduces these runs."""
    return (f".venv/bin/lodestar bench sim --cluster configs/clusters/{scenario.cluster}.yaml \\\n"
            f"    --workload configs/workloads/{scenario.workload}.yaml --rate {scenario.rate:g} "
            f"--duration {scenario.duration_s:g} --seeds {','.join(map(str, seeds))} \\\n"
            f"    --policies {','.join(policies)} --out .run/bench/{out_name}")


def _x(value: float) -> str:
    return f"{value:.2f}x"


def _settle(s: Settling | None) -> str:
    if s is None:
        return "-"
    return "never" if s.settle_s is None else f"{s.settle_s:.0f} s"


def _steady(s: Settling | None) -> str:
    return "-" if s is None else f"{s.steady:.1f} ms"


def _steady_x(s: Settling | None) -> str:
    return "-" if s is None else _x(s.steady)


def title_of(scenario: Scenario) -> str:
    return f"{scenario.cluster} / {scenario.workload} @ {scenario.rate:g}/s"


def summary_markdown(reports: Sequence[ScenarioReport], source: Mapping[str, str], wall_s: float,
                     invocations: int, default_family: str) -> str:
    """The learned section's top: the scenario summary table and the targets, met or missed by how much."""
    lines = [
        f"Numbers from commit `{source['commit'][:10]}`"
        + (f" with uncommitted changes in {source['dirty_files']}" if source["dirty_files"] else "")
        + f"; `learned` is the `{default_family}` family (settings `learner.model`). "
        f"Simulating the {len(reports)} scenarios took {wall_s / 60:.1f} min of wall time on the shared "
        f"2-core machine, 2 processes, over {invocations} invocation(s) of "
        "`.venv/bin/python scripts/results_campaign.py` (runs are cached under .run/campaign while the "
        "simulator, policies, learner, core and configs are unchanged).",
        "",
        "x = best baseline's TTFT / learned's TTFT, per seed, then mean over seeds (min over seeds in "
        "brackets); the best baseline is the scenario's baseline with the least mean TTFT over seeds (of "
        f"the seven: {', '.join(BASELINES)}; of three on the shift scenarios). "
        "Warm x = the same ratio over the requests that arrived after the learner's first validated "
        "snapshot (per seed), i.e. without the cold-start fallback. "
        "Oracle gap = learned mean TTFT / oracle mean TTFT on seed 1 (- where the oracle was not run). "
        f"Settle x = time from cold start (or from the shift) until the {WINDOW_S:.0f} s-window x curve "
        f"(seeds pooled) stays within {TOLERANCE:.0%} of its steady value (over the last third of the run); "
        "settle abs = the same rule on learned's own mean TTFT curve, with the best baseline's figure under "
        "that rule in brackets: a baseline does not learn, so its figure is what the traffic's own changes "
        "do to the rule (- where the run is shorter than 240 s). Model share = learned decisions made by the "
        "model rather than the cold-start / out-of-range fallback.",
        "",
        "| scenario | kind | best baseline | x mean | x P99 | warm x | oracle gap | settle x | settle abs "
        "(baseline) | model share | requests |",
        "|---|---|---|---:|---:|---:|---:|---|---|---:|---:|",
    ]
    for r in reports:
        c = r.learned
        gap = "-" if c.oracle_gap is None else f"{c.oracle_gap:.2f}"
        lines.append(
            f"| [{title_of(r.scenario)}](#{anchor(r.scenario)}) | {'homo' if r.homogeneous else 'hetero'} | "
            f"{c.baseline} | {_x(c.mean_x)} ({_x(c.mean_x_min)}) | {_x(c.p99_x)} ({_x(c.p99_x_min)}) | "
            f"{_x(r.warm_x)} | {gap} | {_settle(r.x_settling)} | {_settle(r.settling)} "
            f"({_settle(r.baseline_settling)}) | {r.model_share:.0%} | {r.requests:,} |")
    lines += ["", *targets_markdown(reports)]
    return "\n".join(lines) + "\n"


def targets_markdown(reports: Sequence[ScenarioReport]) -> list[str]:
    """One line per target: how many scenarios meet it and the worst case."""
    hetero = [r for r in reports if not r.homogeneous]
    homo = [r for r in reports if r.homogeneous]
    rows: list[tuple[str, list[tuple[str, float]], float, bool]] = [
        (f"heterogeneous: mean TTFT >= {HETERO_TARGET}x best baseline",
         [(title_of(r.scenario), r.learned.mean_x) for r in hetero], HETERO_TARGET, True),
        (f"heterogeneous: P99 TTFT >= {HETERO_TARGET}x best baseline",
         [(title_of(r.scenario), r.learned.p99_x) for r in hetero], HETERO_TARGET, True),
        (f"homogeneous: mean TTFT >= {HOMO_TARGET}x best baseline",
         [(title_of(r.scenario), r.learned.mean_x) for r in homo], HOMO_TARGET, True),
        (f"everywhere: mean TTFT >= {FLOOR_TARGET}x best baseline",
         [(title_of(r.scenario), r.learned.mean_x) for r in reports], FLOOR_TARGET, True),
        (f"everywhere: P99 TTFT >= {FLOOR_TARGET}x best baseline",
         [(title_of(r.scenario), r.learned.p99_x) for r in reports], FLOOR_TARGET, True),
        (f"x curve settles within {SETTLE_TARGET_S:.0f} s (cold start, and after a shift)",
         [(title_of(r.scenario), math.inf if r.x_settling.settle_s is None else r.x_settling.settle_s)
          for r in reports if r.x_settling is not None], SETTLE_TARGET_S, False),
        (f"own TTFT curve settles within {SETTLE_TARGET_S:.0f} s",
         [(title_of(r.scenario), math.inf if r.settling.settle_s is None else r.settling.settle_s)
          for r in reports if r.settling is not None], SETTLE_TARGET_S, False),
        (f"mean TTFT within {ORACLE_TARGET - 1:.0%} of the oracle (gap <= {ORACLE_TARGET})",
         [(title_of(r.scenario), r.learned.oracle_gap) for r in reports if r.learned.oracle_gap is not None],
         ORACLE_TARGET, False),
    ]
    lines = ["| target | met | worst scenario | missed (value) |", "|---|---:|---|---|"]
    for label, values, target, higher in rows:
        if not values:
            continue
        met = [v for _, v in values if (v >= target if higher else v <= target)]
        worst_name, worst = (min if higher else max)(values, key=lambda nv: nv[1])
        misses = [f"{name} ({v:.2f})" if v != math.inf else f"{name} (never)"
                  for name, v in values if not (v >= target if higher else v <= target)]
        lines.append(f"| {label} | {len(met)}/{len(values)} | {worst_name}: "
                     f"{'never' if worst == math.inf else f'{worst:.2f}'} | {'; '.join(misses) or '-'} |")
    return lines


def anchor(scenario: Scenario) -> str:
    """The GitHub heading anchor of a scenario's detail heading."""
    text = title_of(scenario).lower()
    return "".join(ch for ch in text.replace(" ", "-") if ch.isalnum() or ch in "-_")


def scenario_markdown(r: ScenarioReport) -> str:
    """A scenario's commands, its per-policy table and the learned-vs-best-baseline line."""
    sc = r.scenario
    seeds = list(sc.seeds)
    policies = sc.policies
    cmds = [bench_command(sc, policies, seeds, sc.slug)]
    if sc.oracle:
        cmds.append(bench_command(sc, [LEARNED, ORACLE], seeds[:1], sc.slug + "-oracle"))
    c = r.learned
    out = [f"#### {title_of(sc)}", "", "```bash", *cmds, "```", ""]
    shift = f"; shift at t = {sc.shift_at_s:g} s" if sc.shift_at_s is not None else ""
    out.append(f"{r.requests:,} requests per seed over {r.span_s:.0f} s of arrivals{shift}. Mean over seeds "
               f"{','.join(map(str, seeds))} (oracle: seed {seeds[0]} only); latencies in ms; "
               f"x = {c.baseline} (best baseline) / policy.")
    out += ["", "| policy | TTFT mean | P50 | P90 | P99 | E2E mean | hit rate | load share | x mean | x P99 |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    order = [*sc.baselines, LEARNED, *([RIVER] if sc.families else []), *([ORACLE] if sc.oracle else [])]
    for policy in order:
        prs = [row for row in r.rows if row["policy"] == policy]
        if not prs:
            continue
        def m(key: str, prs: list[dict[str, Any]] = prs) -> float:
            return float(np.mean([row[key] for row in prs]))
        share: dict[str, float] = {}
        for row in prs:
            for gpu, s in row["load_share"].items():
                share[gpu] = share.get(gpu, 0.0) + s / len(prs)
        xm = per_seed_ratios(r.rows, policy, c.baseline, "ttft_mean_ms")
        xp = per_seed_ratios(r.rows, policy, c.baseline, "ttft_p99_ms")
        name = f"**{policy}**" if policy == c.baseline else policy
        out.append(f"| {name} | {m('ttft_mean_ms'):,.1f} | {m('ttft_p50_ms'):,.1f} | {m('ttft_p90_ms'):,.1f} | "
                   f"{m('ttft_p99_ms'):,.0f} | {m('e2e_mean_ms'):,.0f} | {m('prefix_hit_rate'):.3f} | "
                   f"{' '.join(f'{g} {s:.0%}' for g, s in share.items()) if len(share) > 1 else '-'} | "
                   f"{_x(float(np.mean(xm)))} | {_x(float(np.mean(xp)))} |")
    gap = "" if c.oracle_gap is None else f"; oracle gap {c.oracle_gap:.2f}"
    out += ["", f"Learned vs {c.baseline}: mean {_x(c.mean_x)} (min over seeds {_x(c.mean_x_min)}), "
                f"P99 {_x(c.p99_x)} (min {_x(c.p99_x_min)}){gap}; mean after the first validated snapshot "
                f"(at t = {first_validated(r)}) {_x(r.warm_x)}; the model made {r.model_share:.0%} of the "
                f"learned decisions; settle x {_settle(r.x_settling)}, abs {_settle(r.settling)} (best "
                f"baseline's own: {_settle(r.baseline_settling)}).", ""]
    return "\n".join(out)


def families_markdown(reports: Sequence[ScenarioReport], default_family: str) -> str:
    """The two model families side by side where both ran."""
    lines = [f"| scenario | best baseline | {LEARNED} ({default_family}) x mean | x P99 | oracle gap | "
             f"{RIVER} x mean | x P99 |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in reports:
        if r.river is None:
            continue
        gap = "-" if r.learned.oracle_gap is None else f"{r.learned.oracle_gap:.2f}"
        lines.append(f"| {title_of(r.scenario)} | {r.learned.baseline} | {_x(r.learned.mean_x)} "
                     f"({_x(r.learned.mean_x_min)}) | {_x(r.learned.p99_x)} | {gap} | {_x(r.river.mean_x)} "
                     f"({_x(r.river.mean_x_min)}) | {_x(r.river.p99_x)} |")
    return "\n".join(lines) + "\n"


def plot_curve(runs: Mapping[RunKey, RunData], r: ScenarioReport, path: Path) -> None:
    """Three panels over arrival time, seeds pooled, per window: mean TTFT of learned, the best baseline
    (and the oracle, seed 1); the x curve (best baseline / learned) with its steady band and settle time;
    the share of learned decisions the model made (not the fallback)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = r.scenario
    end = min(sc.duration_s, r.span_s)
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 2, 1))
    means: dict[str, np.ndarray] = {}
    for policy, style in ((LEARNED, "-"), (r.learned.baseline, "--"), (ORACLE, ":")):
        if not seed_runs(runs, sc, policy):
            continue
        arrival, ttft = pooled(runs, sc, policy)
        starts, means[policy] = window_means(arrival, ttft, 0.0, end, WINDOW_S)
        label = f"{policy} (seed 1)" if policy == ORACLE else policy
        top.plot(starts + WINDOW_S / 2, means[policy], style, marker="o", markersize=3, label=label)
    top.set_ylabel(f"mean TTFT per {WINDOW_S:.0f} s (ms)")
    top.set_title(f"{title_of(sc)}, seeds {','.join(map(str, sc.seeds))} pooled", fontsize=10)
    middle.plot(starts + WINDOW_S / 2, means[r.learned.baseline] / means[LEARNED], marker="o", markersize=3,
                color="black", label=f"x = {r.learned.baseline} / learned")
    middle.axhline(1.0, color="grey", lw=0.8, ls=":")
    middle.set_ylabel("x per window")
    if r.x_settling is not None:
        steady = r.x_settling.steady
        middle.axhspan(steady * (1 - TOLERANCE), steady * (1 + TOLERANCE), color="grey", alpha=0.2,
                       label=f"steady x {steady:.2f} ±{TOLERANCE:.0%}")
        if r.x_settling.settle_s is not None:
            at = (sc.shift_at_s or 0.0) + r.x_settling.settle_s
            for ax in (top, middle):
                ax.axvline(at, color="green", lw=1)
            middle.plot([], [], color="green", lw=1, label=f"settled: {r.x_settling.settle_s:.0f} s")
    if sc.shift_at_s is not None:
        for ax in (top, middle, bottom):
            ax.axvline(sc.shift_at_s, color="red", lw=1)
        top.plot([], [], color="red", lw=1, label=f"shift at {sc.shift_at_s:g} s")
    arrival = np.concatenate([d.arrival_s for d in seed_runs(runs, sc, LEARNED)])
    kind = np.concatenate([d.kind for d in seed_runs(runs, sc, LEARNED)])
    _, share = window_means(arrival, (kind != FALLBACK).astype(np.float64), 0.0, end, WINDOW_S)
    bottom.plot(starts + WINDOW_S / 2, share, marker="o", markersize=3)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("model share")
    bottom.set_xlabel("arrival time (s, virtual)")
    for ax in (top, middle, bottom):
        ax.grid(True, alpha=0.3)
    for ax in (top, middle):
        ax.legend(fontsize="small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def details_markdown(reports: Sequence[ScenarioReport], plots: Mapping[str, Path], doc: Path,
                     default_family: str) -> str:
    """Families, curves, shifts and the per-scenario sections."""
    def rel(p: Path) -> str:
        return os.path.relpath(p, doc.parent)

    out = ["### Model families", "",
           f"`{LEARNED}` ({default_family}) beside `{RIVER}` on the same arrivals (3 seeds):", "",
           families_markdown(reports, default_family)]
    curves = [r for r in reports if r.scenario.curve and r.scenario.slug in plots]
    shifts = [r for r in reports if r.scenario.shift_at_s is not None and r.scenario.slug in plots]
    if curves:
        out += ["### Learning from cold start", ""]
        for r in curves:
            out += [f"**{title_of(r.scenario)}**: the x curve settles in {_settle(r.x_settling)} (steady x "
                    f"{_steady_x(r.x_settling)}); learned's own TTFT curve in {_settle(r.settling)} (steady "
                    f"{_steady(r.settling)}; the best baseline's own curve under that rule: "
                    f"{_settle(r.baseline_settling)}); first validated snapshot at t = {first_validated(r)} "
                    "(per seed).", "", f"![learning curve]({rel(plots[r.scenario.slug])})", ""]
    if shifts:
        out += ["### Adaptation after a shift", ""]
        for r in shifts:
            out += [f"**{title_of(r.scenario)}** (shift at t = {r.scenario.shift_at_s:g} s): the x curve "
                    f"settles {_settle(r.x_settling)} after the shift (steady x {_steady_x(r.x_settling)}); "
                    f"learned's own TTFT curve {_settle(r.settling)} (new steady state {_steady(r.settling)}; "
                    f"best baseline's own: {_settle(r.baseline_settling)}).", "",
                    f"![adaptation]({rel(plots[r.scenario.slug])})", ""]
    out += ["### Per scenario", ""]
    out += [scenario_markdown(r) for r in reports]
    return "\n".join(out)


def first_validated(r: ScenarioReport) -> str:
    """When the learner's first validated snapshot came out, per seed."""
    return ", ".join("never" if math.isnan(t) else f"{t:.0f} s" for t in r.first_validated_s) or "-"


def replace_region(text: str, name: str, body: str) -> str:
    """Replace the generated region `name` in `text` (markers kept)."""
    begin, end = f"<!-- generated:{name}:begin -->", f"<!-- generated:{name}:end -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"docs/results.md lacks the markers of region {name!r}")
    return text[:i + len(begin)] + "\n" + body.rstrip() + "\n" + text[j:]


LEARNED_SECTION_SKELETON = """## Learned routing

<!-- generated:summary:begin -->
<!-- generated:summary:end -->

<!-- generated:details:begin -->
<!-- generated:details:end -->

"""


def write_doc(doc: Path, summary: str, details: str) -> None:
    """Fill the generated regions of the learned section (added before the baselines if it is missing)."""
    text = doc.read_text()
    if "<!-- generated:summary:begin -->" not in text:
        at = text.index("## Baselines")
        text = text[:at] + LEARNED_SECTION_SKELETON + text[at:]
    doc.write_text(replace_region(replace_region(text, "summary", summary), "details", details))


def write_scenario_files(out: Path, r: ScenarioReport) -> None:
    """results.json (every run's row, as `lodestar bench sim` writes it) and results.md per scenario."""
    from sim.report import markdown_table, mean_by_policy

    folder = out / r.scenario.slug
    (folder / "results.json").write_text(json.dumps(r.rows, indent=2))
    (folder / "results.md").write_text(f"{title_of(r.scenario)}\n\n"
                                       f"{markdown_table(mean_by_policy(r.rows), r.learned.baseline)}")


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
        record.write_text(json.dumps({"code": source["code"], "wall_s": total, "invocations": invocations}))
    return total, invocations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2, help="simulations run in parallel")
    parser.add_argument("--out", type=Path, default=ROOT / ".run" / "campaign")
    parser.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--quick", action="store_true", help="smoke subset; writes under <out>-quick, no docs")
    parser.add_argument("--no-doc", action="store_true", help="run and aggregate, but leave the docs alone")
    args = parser.parse_args()

    from lodestar.settings import Settings

    scenarios = QUICK if args.quick else MATRIX
    out = args.out.with_name(args.out.name + "-quick") if args.quick else args.out
    img = out / "img" if args.quick else args.img
    source = source_id()
    dirty = f" + uncommitted changes in {source['dirty_files']}" if source["dirty_files"] else ""
    print(f"source: {source['commit'][:10]}{dirty}", flush=True)
    t0 = time.perf_counter()
    runs, simulated = run_campaign(scenarios, out, args.jobs, source)
    wall_s, invocations = campaign_wall_s(out, source, time.perf_counter() - t0, simulated)
    reports = []
    for sc in scenarios:
        r = scenario_report(runs, sc)
        write_scenario_files(out, r)
        reports.append(r)
    plots = {}
    for r in reports:
        if r.scenario.curve or r.scenario.shift_at_s is not None:
            kind = "shift" if r.scenario.shift_at_s is not None else "learning"
            plots[r.scenario.slug] = img / f"{kind}_{r.scenario.cluster}_{r.scenario.workload}.png"
            plot_curve(runs, r, plots[r.scenario.slug])
    family = Settings().learner.model
    summary = summary_markdown(reports, source, wall_s, invocations, family)
    details = details_markdown(reports, plots, args.doc, family)
    (out / "learned_summary.md").write_text(summary)
    (out / "learned_details.md").write_text(details)
    print(summary)
    if not (args.quick or args.no_doc):
        write_doc(args.doc, summary, details)
        print(f"wrote {args.doc} and {len(plots)} plots in {img}")
    print(f"this invocation {time.perf_counter() - t0:.0f} s; campaign simulation wall time {wall_s:.0f} s "
          f"over {invocations} invocation(s)", flush=True)


if __name__ == "__main__":
    sys.exit(main())
