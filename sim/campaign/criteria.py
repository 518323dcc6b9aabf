"""Issue 11's Done-when, checked on the campaign's figures: a verdict per criterion, with what misses it.

The thresholds come from configs/campaign.yaml (`criteria`); every figure is a mean over seeds. A
criterion that applies to no scenario (no oracle run with enough headroom, no shift scenario) is neither
passed nor failed: its verdict says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


class Criteria(BaseModel):
    """The pass/fail thresholds of the summary, and the two the statistics use (cold-start window, settle
    tolerance)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    floor_x: float = Field(gt=0, allow_inf_nan=False,
                           description="learned mean and P99 TTFT at least this x of the best baseline, everywhere")
    headroom_oracle_x: float = Field(gt=1, allow_inf_nan=False,
                                     description="where the oracle is at least this x better in mean ...")
    headroom_x: float = Field(gt=0, allow_inf_nan=False, description="... learned at least this x in mean and P99")
    share_mean: float = Field(ge=0, le=1, description="average share of the oracle's mean headroom taken")
    share_p99: float = Field(ge=0, le=1, description="average share of the oracle's P99 headroom taken")
    no_headroom_below: float = Field(ge=1, allow_inf_nan=False,
                                     description="an oracle x below this shows no headroom: its share is undefined")
    cold_start_s: float = Field(gt=0, allow_inf_nan=False, description="the cold-start stretch of arrivals (s)")
    cold_start_x: float = Field(gt=0, allow_inf_nan=False, description="learned x on the cold-start stretch")
    settle_s: float = Field(gt=0, allow_inf_nan=False, description="settle time after a shift (s)")
    settle_tolerance: float = Field(gt=0, lt=1, description="'settled': within this fraction of the steady x")


@dataclass(frozen=True, slots=True)
class Figures:
    """What the criteria read of one scenario (means over seeds)."""

    name: str
    mean_x: float  # best baseline / learned, mean TTFT
    p99_x: float  # the same for P99, against the best baseline and the best-tail baseline: the lower
    oracle_x: float | None  # best baseline / oracle, mean TTFT; None where the oracle did not run
    share_mean: float | None  # share of the oracle's mean headroom taken; None where it shows none
    share_p99: float | None
    first_x: float  # best baseline / learned over the cold-start stretch
    shift: bool  # a scenario with a shift
    settle_s: float | None  # after the shift; inf: never settled, None: not measured (run too short)


@dataclass(frozen=True, slots=True)
class Verdict:
    """One criterion over the scenarios: passed (None: it applies to none), how many meet it, the worst case
    and every miss with its value."""

    criterion: str
    passed: bool | None
    met: str
    worst: str
    misses: tuple[str, ...]


def x(value: float) -> str:
    """A ratio as the write-up prints it; `-` where it is undefined (e.g. no validated snapshot: no warm x)."""
    return "-" if math.isnan(value) else f"{value:.2f}x"


def pct(value: float) -> str:
    return f"{value:.0%}"


def seconds(value: float) -> str:
    """A settle time: 'never' for inf, 'not measured' for nan."""
    if math.isnan(value):
        return "not measured"
    return "never" if math.isinf(value) else f"{value:.0f} s"


def _each(criterion: str, values: Sequence[tuple[str, float]], ok: Callable[[float], bool],
          fmt: Callable[[float], str], higher_is_better: bool = True) -> Verdict:
    """A criterion every scenario of `values` must meet (nan never does)."""
    if not values:
        return Verdict(criterion, None, "0/0", "-", ())
    misses = tuple(f"{name} ({fmt(v)})" for name, v in values if not ok(v))

    def badness(nv: tuple[str, float]) -> float:
        v = nv[1]
        if math.isnan(v):
            return math.inf
        return -v if higher_is_better else v

    name, worst = max(values, key=badness)
    return Verdict(criterion, not misses, f"{len(values) - len(misses)}/{len(values)}", f"{name}: {fmt(worst)}",
                   misses)


def _average(criterion: str, values: Sequence[tuple[str, float]], target: float) -> Verdict:
    """A criterion on the average over the scenarios of `values`; the misses are the scenarios below it."""
    if not values:
        return Verdict(criterion, None, "0 scenarios", "-", ())
    mean = sum(v for _, v in values) / len(values)
    name, worst = min(values, key=lambda nv: nv[1])
    misses = tuple(f"{n} ({pct(v)})" for n, v in values if v < target)
    return Verdict(criterion, mean >= target, f"average {pct(mean)} over {len(values)}", f"{name}: {pct(worst)}",
                   misses)


def evaluate(figures: Sequence[Figures], c: Criteria) -> list[Verdict]:
    """Issue 11's Done-when criteria (the dispatcher's CPU cost excepted: the campaign does not measure it)."""
    rich = [f for f in figures if f.oracle_x is not None and f.oracle_x >= c.headroom_oracle_x]
    shifts = [f for f in figures if f.shift]
    return [
        _each(f"mean TTFT >= {x(c.floor_x)} the best baseline, every scenario",
              [(f.name, f.mean_x) for f in figures], lambda v: v >= c.floor_x, x),
        _each(f"P99 TTFT >= {x(c.floor_x)} the best baseline and the best-tail baseline, every scenario",
              [(f.name, f.p99_x) for f in figures], lambda v: v >= c.floor_x, x),
        _each(f"where the oracle shows >= {x(c.headroom_oracle_x)} in mean: mean >= {x(c.headroom_x)}",
              [(f.name, f.mean_x) for f in rich], lambda v: v >= c.headroom_x, x),
        _each(f"where the oracle shows >= {x(c.headroom_oracle_x)} in mean: P99 >= {x(c.headroom_x)}",
              [(f.name, f.p99_x) for f in rich], lambda v: v >= c.headroom_x, x),
        _average(f"share of the oracle's mean headroom taken >= {pct(c.share_mean)} on average",
                 [(f.name, f.share_mean) for f in figures if f.share_mean is not None], c.share_mean),
        _average(f"share of the oracle's P99 headroom taken >= {pct(c.share_p99)} on average",
                 [(f.name, f.share_p99) for f in figures if f.share_p99 is not None], c.share_p99),
        _each(f"first {c.cold_start_s:g} s of a cold start >= {x(c.cold_start_x)} the best baseline",
              [(f.name, f.first_x) for f in figures], lambda v: v >= c.cold_start_x, x),
        _each(f"after a shift, x back within {pct(c.settle_tolerance)} of steady in <= {c.settle_s:g} s",
              [(f.name, math.nan if f.settle_s is None else f.settle_s) for f in shifts],
              lambda v: v <= c.settle_s, seconds, higher_is_better=False),
    ]
