"""One scenario's runs reduced to what the write-up and the criteria need (sim/campaign/stats.py does the
arithmetic)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.campaign.criteria import Criteria, Figures
from sim.campaign.matrix import Scenario
from sim.campaign.runs import FALLBACK, RunData, RunKey
from sim.campaign.stats import (
    WINDOW_S,
    Comparison,
    Headroom,
    Settling,
    compare,
    headroom,
    paired_ratio,
    ratio_settle_time,
    settle_time,
)
from sim.cluster import read_cluster


@dataclass(slots=True)
class ScenarioReport:
    """What the write-up needs about one scenario."""

    scenario: Scenario
    homogeneous: bool
    rows: list[dict[str, Any]]
    learned: Comparison
    families: dict[str, Comparison]  # by label: the model families run beside learned
    headroom: Headroom | None  # where the oracle ran
    first_x: float  # best baseline / learned mean TTFT over the cold-start stretch of arrivals, mean over seeds
    model_share: float  # fraction of learned decisions the model made (not the fallback), over seeds
    first_validated_s: list[float]  # per seed: when the learner's first validated snapshot came out
    warm_x: float  # best baseline / learned mean TTFT on requests arriving after that, mean over seeds
    x_settling: Settling | None  # the paired x curve (best baseline / learned), from cold start or the shift
    settling: Settling | None  # learned's own TTFT curve, from cold start or the shift
    baseline_settling: Settling | None  # the best baseline's TTFT curve by the same rule: the noise floor
    requests: int
    span_s: float

    def figures(self) -> Figures:
        """What the criteria read of this scenario."""
        h = self.headroom
        settle = self.x_settling
        shift = self.scenario.shift_at_s is not None
        return Figures(
            name=self.scenario.title, mean_x=self.learned.mean_x, p99_x=self.learned.worst_p99_x,
            oracle_x=None if h is None else h.oracle_x_mean, share_mean=None if h is None else h.share_mean,
            share_p99=None if h is None else h.share_p99, first_x=self.first_x, shift=shift,
            settle_s=None if settle is None else math.inf if settle.settle_s is None else settle.settle_s)


def cluster_is_homogeneous(scenario: Scenario) -> bool:
    """One GPU type across the cluster file's workers."""
    return len({w.gpu for w in read_cluster(scenario.cluster_path).expand()}) == 1


def seed_runs(runs: Mapping[RunKey, RunData], scenario: Scenario, label: str) -> list[RunData]:
    """The runs of `label` on `scenario`, by seed."""
    return [d for k, d in sorted(runs.items(), key=lambda kd: kd[0].seed)
            if k.scenario == scenario and k.label == label]


def pooled(runs: Mapping[RunKey, RunData], scenario: Scenario, label: str) -> tuple[np.ndarray, np.ndarray]:
    """Arrival times and TTFTs (ms) of `label` on `scenario`, all its seeds pooled."""
    chosen = seed_runs(runs, scenario, label)
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


def _mean_of_defined(values: list[float]) -> float:
    """The mean of the values that are not nan (per-seed figures some seeds lack); nan if none is."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan


def scenario_report(runs: Mapping[RunKey, RunData], scenario: Scenario, criteria: Criteria) -> ScenarioReport:
    """Aggregate one scenario's runs."""
    rows = [d.row for k, d in runs.items() if k.scenario == scenario]
    learned = compare(rows, scenario.learned, scenario.baselines, scenario.oracle)
    families = {f: compare(rows, f, scenario.baselines, scenario.oracle) for f in scenario.families}
    room = (headroom(rows, learned, scenario.oracle, min_oracle_x=criteria.no_headroom_below)
            if scenario.oracle else None)
    mine, base = seed_runs(runs, scenario, scenario.learned), seed_runs(runs, scenario, learned.baseline)
    kinds = np.concatenate([d.kind for d in mine])
    validated = [next((s["at_s"] for s in d.snapshots if s["validated"]), math.nan) for d in mine]
    warm_x = _mean_of_defined([paired_ratio(b.arrival_s, b.ttft_s, d.arrival_s, d.ttft_s, from_s=t)
                               for b, d, t in zip(base, mine, validated, strict=True)])
    first_x = _mean_of_defined([paired_ratio(b.arrival_s, b.ttft_s, d.arrival_s, d.ttft_s,
                                             until_s=criteria.cold_start_s)
                                for b, d in zip(base, mine, strict=True)])
    arrival, ttft = pooled(runs, scenario, scenario.learned)
    base_arrival, base_ttft = pooled(runs, scenario, learned.baseline)
    span = curve_span(scenario, arrival)
    x_settling = settling = baseline_settling = None
    if span is not None:
        start, steady_from, end = span
        rule = {"start_s": start, "steady_from_s": steady_from, "end_s": end,
                "tolerance": criteria.settle_tolerance}
        x_settling = ratio_settle_time(base_arrival, base_ttft, arrival, ttft, **rule)
        settling = settle_time(arrival, ttft, **rule)
        baseline_settling = settle_time(base_arrival, base_ttft, **rule)
    return ScenarioReport(
        scenario, cluster_is_homogeneous(scenario), rows, learned, families, room, first_x,
        float(np.mean(kinds != FALLBACK)), validated, warm_x, x_settling, settling, baseline_settling,
        int(np.mean([r["completed"] for r in rows if r["policy"] == scenario.learned])), float(arrival.max()))
