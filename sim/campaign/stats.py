"""The campaign's statistics, pure functions of results rows and per-request series.

Rows are `lodestar bench sim` results rows (`policy` is the run's label, `seed`, `ttft_mean_ms`, ...).
A ratio "x" is reference / policy for a latency, per seed both ran, so > 1 means the policy is better.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.report import mean_by_policy, pick_baseline

WINDOW_S = 30.0  # learning-curve window
MEAN, P99 = "ttft_mean_ms", "ttft_p99_ms"


def best_baseline(rows: Sequence[Mapping[str, Any]], baselines: Sequence[str], key: str = MEAN) -> str:
    """The baseline with the least `key` (by default mean TTFT), averaged over its seeds; ties: the first
    listed."""
    best = pick_baseline(mean_by_policy(rows), baselines, key)
    if best is None:
        raise ValueError("no baseline ran")
    return best


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
    """`policy` against the best baseline (by mean TTFT over seeds) and against the best-tail baseline (by
    P99 TTFT over seeds): mean and min over seeds of the ratios, and the oracle gap."""

    policy: str
    baseline: str
    mean_x: float
    mean_x_min: float
    p99_x: float
    p99_x_min: float
    tail_baseline: str  # the baseline with the least P99 over seeds (often `baseline`)
    tail_p99_x: float
    tail_p99_x_min: float
    oracle_gap: float | None  # policy mean TTFT / oracle mean TTFT, on the first seed the oracle ran

    @property
    def worst_p99_x(self) -> float:
        """P99 x against the stricter of the two baselines: "never worse in the tail" checks this one."""
        return min(self.p99_x, self.tail_p99_x)


def compare(rows: Sequence[Mapping[str, Any]], policy: str, baselines: Sequence[str],
            oracle: str | None = None) -> Comparison:
    """How `policy` does against the best of `baselines` and the oracle (if it ran)."""
    base, tail = best_baseline(rows, baselines), best_baseline(rows, baselines, P99)
    mean_x = per_seed_ratios(rows, policy, base, MEAN)
    p99_x = per_seed_ratios(rows, policy, base, P99)
    tail_x = per_seed_ratios(rows, policy, tail, P99)
    if not mean_x:
        raise ValueError(f"{policy} and {base} share no seed")
    gaps = [1.0 / v for v in per_seed_ratios(rows, policy, oracle, MEAN) if v > 0] if oracle else []
    return Comparison(policy, base, float(np.mean(mean_x)), min(mean_x), float(np.mean(p99_x)), min(p99_x),
                      tail, float(np.mean(tail_x)), min(tail_x), gaps[0] if gaps else None)


def headroom_share(best: float, policy: float, oracle: float, *, min_oracle_x: float) -> float | None:
    """(best - policy) / (best - oracle): the share of the oracle's headroom over the best baseline that the
    policy takes (1: as good as the oracle, 0: as the baseline, < 0: worse than it). None where the oracle
    shows no headroom (best / oracle below `min_oracle_x`): the share of nothing is noise."""
    if not (oracle > 0 and best / oracle >= min_oracle_x):
        return None
    return (best - policy) / (best - oracle)


@dataclass(frozen=True, slots=True)
class Headroom:
    """The oracle against the best baselines, on the seeds it ran, and the share of that headroom the policy
    takes: mean TTFT against the best baseline, P99 against the best-tail baseline."""

    seeds: tuple[int, ...]
    oracle_x_mean: float  # best baseline / oracle, mean TTFT
    oracle_x_p99: float  # best-tail baseline / oracle, P99 TTFT
    share_mean: float | None  # None: no headroom in mean
    share_p99: float | None


def headroom(rows: Sequence[Mapping[str, Any]], comparison: Comparison, oracle: str, *,
             min_oracle_x: float) -> Headroom | None:
    """The oracle's headroom and the share `comparison.policy` takes of it, from the means over the seeds the
    oracle, the policy and both baselines ran; None if there is no such seed."""
    by = {(r["policy"], r["seed"]): r for r in rows}
    names = (comparison.baseline, comparison.tail_baseline, comparison.policy, oracle)
    seeds = tuple(sorted(r["seed"] for r in rows if r["policy"] == oracle
                         and all((p, r["seed"]) in by for p in names)))
    if not seeds:
        return None

    def mean(policy: str, key: str) -> float:
        return float(np.mean([by[policy, s][key] for s in seeds]))

    best, tail, mine, best_o = (mean(comparison.baseline, MEAN), mean(comparison.tail_baseline, P99),
                                mean(comparison.policy, MEAN), mean(oracle, MEAN))
    mine_p99, tail_o = mean(comparison.policy, P99), mean(oracle, P99)
    return Headroom(seeds, best / best_o, tail / tail_o,
                    headroom_share(best, mine, best_o, min_oracle_x=min_oracle_x),
                    headroom_share(tail, mine_p99, tail_o, min_oracle_x=min_oracle_x))


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
                tolerance: float, window_s: float = WINDOW_S) -> Settling:
    """When the curve from `start_s` settles: the steady state is the mean over arrivals in
    [steady_from_s, end_s); the settle time is the start of the first `window_s` window (counted from
    `start_s`) from which every window's mean stays within `tolerance` of it, empty windows skipped."""
    if not start_s <= steady_from_s < end_s:
        raise ValueError("need start_s <= steady_from_s < end_s")
    steady = float(values[_tail(arrival_s, steady_from_s, end_s)].mean())
    starts, means = window_means(arrival_s, values, start_s, end_s, window_s)
    return Settling(steady, _settled_after(starts, means, steady, start_s, tolerance))


def ratio_settle_time(ref_arrival_s: np.ndarray, ref: np.ndarray, arrival_s: np.ndarray, values: np.ndarray, *,
                      start_s: float, steady_from_s: float, end_s: float, tolerance: float,
                      window_s: float = WINDOW_S) -> Settling:
    """`settle_time` of the paired curve mean(ref) / mean(values) per window (the x of `values` over `ref`
    on the same arrivals): what changes with the traffic moves both and cancels, learning does not."""
    if not start_s <= steady_from_s < end_s:
        raise ValueError("need start_s <= steady_from_s < end_s")
    steady = float(ref[_tail(ref_arrival_s, steady_from_s, end_s)].mean()
                   / values[_tail(arrival_s, steady_from_s, end_s)].mean())
    starts, ref_means = window_means(ref_arrival_s, ref, start_s, end_s, window_s)
    _, means = window_means(arrival_s, values, start_s, end_s, window_s)
    return Settling(steady, _settled_after(starts, ref_means / means, steady, start_s, tolerance))


def paired_ratio(ref_arrival_s: np.ndarray, ref: np.ndarray, arrival_s: np.ndarray, values: np.ndarray, *,
                 from_s: float = -math.inf, until_s: float = math.inf) -> float:
    """mean(ref) / mean(values) over the requests of each arriving in [from_s, until_s): the x of `values`
    over `ref` on the same stretch of arrivals (nan if either has none there)."""
    ref_in = ref[(ref_arrival_s >= from_s) & (ref_arrival_s < until_s)]
    within = values[(arrival_s >= from_s) & (arrival_s < until_s)]
    if len(ref_in) == 0 or len(within) == 0:
        return math.nan
    return float(ref_in.mean() / within.mean())
