"""The results campaign's numbers (sim/campaign/): best-baseline choice, per-seed ratios, the oracle's headroom
and the share of it taken, learning curves and their settle time, the first-minute x, one scenario's
aggregate and issue 11's pass/fail criteria, on small constructed inputs."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sim.campaign.aggregate import ScenarioReport, scenario_report
from sim.campaign.criteria import Criteria, Figures, evaluate
from sim.campaign.matrix import Campaign, Scenario
from sim.campaign.runs import FALLBACK, MODEL, RunData, RunKey
from sim.campaign.stats import (
    best_baseline,
    compare,
    headroom,
    headroom_share,
    paired_ratio,
    per_seed_ratios,
    ratio_settle_time,
    settle_time,
    window_means,
)
from sim.campaign_report import bench_command, details_markdown, replace_region, summary_markdown, write_doc
from sim.policy_factory import PolicySpec

TOL = 0.10


def row(policy: str, seed: int, mean: float, p99: float) -> dict:
    return {"policy": policy, "seed": seed, "ttft_mean_ms": mean, "ttft_p99_ms": p99}


ROWS = [
    row("least_request", 1, 100.0, 900.0), row("least_request", 2, 120.0, 1000.0),
    # lmetric is worse on seed 1 but better on average: the best baseline is chosen on the mean over seeds.
    row("lmetric", 1, 110.0, 800.0), row("lmetric", 2, 90.0, 600.0),
    row("learned", 1, 55.0, 400.0), row("learned", 2, 60.0, 600.0),
    row("oracle", 1, 50.0, 350.0),
]
# A baseline with the best tail but not the best mean.
TAIL = [row("gpu_speed_queue", 1, 130.0, 500.0), row("gpu_speed_queue", 2, 130.0, 500.0)]


def test_best_baseline_is_least_mean_over_seeds_among_those_that_ran() -> None:
    assert best_baseline(ROWS, ["least_request", "lmetric", "gpu_speed_queue"]) == "lmetric"
    assert best_baseline(ROWS, ["least_request"]) == "least_request"
    assert best_baseline(ROWS + TAIL, ["least_request", "lmetric", "gpu_speed_queue"], "ttft_p99_ms") \
        == "gpu_speed_queue"
    with pytest.raises(ValueError):
        best_baseline(ROWS, ["gpu_speed_queue"])


def test_per_seed_ratios_pair_runs_by_seed() -> None:
    assert per_seed_ratios(ROWS, "learned", "lmetric", "ttft_mean_ms") == pytest.approx([2.0, 1.5])
    # The oracle ran on seed 1 only: one ratio.
    assert per_seed_ratios(ROWS, "learned", "oracle", "ttft_mean_ms") == pytest.approx([50.0 / 55.0])


def test_compare_against_best_baseline_and_oracle() -> None:
    c = compare(ROWS, "learned", ["least_request", "lmetric"], "oracle")
    assert c.baseline == "lmetric" and c.tail_baseline == "lmetric"
    assert c.mean_x == pytest.approx(1.75) and c.mean_x_min == pytest.approx(1.5)
    assert c.p99_x == pytest.approx((2.0 + 1.0) / 2) and c.p99_x_min == pytest.approx(1.0)
    assert c.tail_p99_x == c.p99_x
    assert c.oracle_gap == pytest.approx(1.1)
    assert compare(ROWS, "learned", ["lmetric"]).oracle_gap is None  # no oracle named
    no_oracle = compare([r for r in ROWS if r["policy"] != "oracle"], "learned", ["lmetric"], "oracle")
    assert no_oracle.oracle_gap is None


def test_the_tail_is_checked_against_the_best_tail_baseline_too() -> None:
    c = compare(ROWS + TAIL, "learned", ["least_request", "lmetric", "gpu_speed_queue"])
    assert c.baseline == "lmetric" and c.tail_baseline == "gpu_speed_queue"
    assert c.p99_x == pytest.approx(1.5)  # against lmetric's tail: 800/400, 600/600
    assert c.tail_p99_x == pytest.approx((500 / 400 + 500 / 600) / 2) and c.tail_p99_x_min == pytest.approx(500 / 600)
    assert c.worst_p99_x == c.tail_p99_x


def test_headroom_share_is_the_fraction_of_the_gap_to_the_oracle() -> None:
    assert headroom_share(100.0, 70.0, 40.0, min_oracle_x=1.05) == pytest.approx(0.5)
    assert headroom_share(100.0, 100.0, 40.0, min_oracle_x=1.05) == 0.0
    assert headroom_share(100.0, 130.0, 40.0, min_oracle_x=1.05) == pytest.approx(-0.5)  # worse than the baseline
    assert headroom_share(100.0, 30.0, 40.0, min_oracle_x=1.05) == pytest.approx(70 / 60)  # beats the oracle
    # No headroom: the oracle is barely better, or worse, than the best baseline.
    assert headroom_share(100.0, 90.0, 97.0, min_oracle_x=1.05) is None
    assert headroom_share(100.0, 90.0, 120.0, min_oracle_x=1.05) is None


def test_headroom_on_the_seeds_the_oracle_ran() -> None:
    c = compare(ROWS, "learned", ["least_request", "lmetric"], "oracle")
    h = headroom(ROWS, c, "oracle", min_oracle_x=1.05)
    assert h is not None and h.seeds == (1,)
    assert h.oracle_x_mean == pytest.approx(110 / 50) and h.oracle_x_p99 == pytest.approx(800 / 350)
    assert h.share_mean == pytest.approx((110 - 55) / (110 - 50))
    assert h.share_p99 == pytest.approx((800 - 400) / (800 - 350))
    # P99 headroom is over the best-tail baseline.
    tail_rows = ROWS + TAIL
    ct = compare(tail_rows, "learned", ["least_request", "lmetric", "gpu_speed_queue"], "oracle")
    ht = headroom(tail_rows, ct, "oracle", min_oracle_x=1.05)
    assert ht is not None
    assert ht.oracle_x_p99 == pytest.approx(500 / 350) and ht.share_p99 == pytest.approx((500 - 400) / (500 - 350))
    # An oracle with no mean headroom: the share is undefined, the P99 one still counts.
    flat = [r for r in ROWS if r["policy"] != "oracle"] + [row("oracle", 1, 108.0, 350.0)]
    hf = headroom(flat, c, "oracle", min_oracle_x=1.05)
    assert hf is not None and hf.share_mean is None and hf.share_p99 is not None
    assert headroom([r for r in ROWS if r["policy"] != "oracle"], c, "oracle", min_oracle_x=1.05) is None


def test_window_means_leave_empty_windows_nan() -> None:
    arrival = np.array([1.0, 2.0, 31.0, 95.0])
    values = np.array([10.0, 20.0, 30.0, 40.0])
    starts, means = window_means(arrival, values, 0.0, 120.0, 30.0)
    assert starts.tolist() == [0.0, 30.0, 60.0, 90.0]
    assert means[0] == 15.0 and means[1] == 30.0 and math.isnan(means[2]) and means[3] == 40.0


def curve(levels: list[float], window_s: float = 30.0, per_window: int = 10, start_s: float = 0.0):
    """Arrivals spread over consecutive windows, each window at a constant value."""
    arrival = np.concatenate([start_s + i * window_s + np.linspace(0, window_s, per_window, endpoint=False)
                              for i in range(len(levels))])
    return arrival, np.repeat(np.array(levels, dtype=np.float64), per_window)


def test_settle_time_of_a_learning_curve() -> None:
    # Cold start at 300 ms, then 150 and 120, then steady around 100 from the fourth window on.
    arrival, ttft = curve([300, 150, 120, 105, 100, 98, 102, 100, 99, 101])
    s = settle_time(arrival, ttft, start_s=0.0, steady_from_s=200.0, end_s=300.0, tolerance=TOL)
    assert s.steady == pytest.approx(np.mean([100, 99, 101, 100]), rel=0.02)
    assert s.settle_s == 90.0


def test_a_late_excursion_pushes_the_settle_time_past_it() -> None:
    arrival, ttft = curve([300, 100, 100, 130, 100, 100, 100, 100, 100, 100])
    s = settle_time(arrival, ttft, start_s=0.0, steady_from_s=200.0, end_s=300.0, tolerance=TOL)
    assert s.settle_s == 120.0
    # A looser tolerance lets the excursion pass.
    assert settle_time(arrival, ttft, start_s=0.0, steady_from_s=200.0, end_s=300.0, tolerance=0.4).settle_s == 30.0


def test_settle_time_counts_from_the_shift() -> None:
    before, _ = curve([100] * 5)
    after_arrival, after = curve([400, 250, 210, 200, 200, 200, 200, 200, 200], start_s=150.0)
    arrival = np.concatenate([before, after_arrival])
    ttft = np.concatenate([np.full(len(before), 100.0), after])
    s = settle_time(arrival, ttft, start_s=150.0, steady_from_s=330.0, end_s=420.0, tolerance=TOL)
    assert s.steady == pytest.approx(200.0)
    assert s.settle_s == 60.0  # the third window after the shift (210) is within 10% of 200


def test_a_curve_still_off_at_the_end_never_settles() -> None:
    arrival, ttft = curve([100, 100, 100, 100, 100, 100, 100, 100, 100, 200])
    s = settle_time(arrival, ttft, start_s=0.0, steady_from_s=200.0, end_s=300.0, tolerance=TOL)
    assert s.settle_s is None


def test_settle_time_rejects_a_steady_stretch_outside_the_curve() -> None:
    arrival, ttft = curve([100, 100])
    with pytest.raises(ValueError):
        settle_time(arrival, ttft, start_s=0.0, steady_from_s=90.0, end_s=60.0, tolerance=TOL)


def test_the_paired_x_curve_cancels_what_the_traffic_does_to_both() -> None:
    # The traffic has a heavy phase (windows 5-6) that doubles every policy's TTFT; learned is 2x better than
    # the baseline from the third window on. Its own curve never settles; the x curve settles at 60 s.
    phase = [1, 1, 1, 1, 1, 2, 2, 1, 1, 1]
    base_arrival, base = curve([100.0 * p for p in phase])
    arrival, learned = curve([100.0, 80.0] + [50.0 * p for p in phase[2:]])
    x = ratio_settle_time(base_arrival, base, arrival, learned, start_s=0.0, steady_from_s=200.0, end_s=300.0,
                          tolerance=TOL)
    assert x.steady == pytest.approx(2.0)
    assert x.settle_s == 60.0
    own = settle_time(arrival, learned, start_s=0.0, steady_from_s=200.0, end_s=300.0, tolerance=TOL)
    assert own.settle_s == 210.0


def test_paired_ratio_compares_the_same_arrival_stretch() -> None:
    base_arrival, base = curve([400, 100, 100])
    arrival, learned = curve([800, 50, 50])
    assert paired_ratio(base_arrival, base, arrival, learned, from_s=30.0) == pytest.approx(2.0)
    assert paired_ratio(base_arrival, base, arrival, learned) == pytest.approx(600 / 900)
    assert math.isnan(paired_ratio(base_arrival, base, arrival, learned, from_s=500.0))
    # The first minute: the cold-start window and the one after it.
    assert paired_ratio(base_arrival, base, arrival, learned, until_s=60.0) == pytest.approx(500 / 850)
    assert paired_ratio(base_arrival, base, arrival, learned, until_s=30.0) == pytest.approx(0.5)


CRITERIA = Criteria(floor_x=0.97, headroom_oracle_x=1.6, headroom_x=1.5, share_mean=0.7, share_p99=0.5,
                    no_headroom_below=1.05, cold_start_s=60, cold_start_x=0.97, settle_s=120, settle_tolerance=0.1)
GOOD = Figures(name="a", mean_x=1.8, p99_x=1.9, oracle_x=2.0, share_mean=0.8, share_p99=0.6, first_x=1.0,
               shift=False, settle_s=None)


def passed(*figures: Figures) -> list[bool | None]:
    return [v.passed for v in evaluate(list(figures), CRITERIA)]


def test_criteria_all_pass_on_a_good_campaign() -> None:
    shift = replace(GOOD, name="s", oracle_x=None, share_mean=None, share_p99=None, shift=True, settle_s=90.0)
    assert passed(GOOD, shift) == [True] * 8


def test_criteria_floor_counts_every_scenario_and_names_the_misses() -> None:
    bad = replace(GOOD, name="b", mean_x=0.9, p99_x=0.5)
    v = evaluate([GOOD, bad], CRITERIA)
    assert [x.passed for x in v[:2]] == [False, False]
    assert v[0].met == "1/2" and v[0].misses == ("b (0.90x)",) and v[0].worst == "b: 0.90x"
    assert v[1].misses == ("b (0.50x)",)


def test_criteria_headroom_targets_apply_only_where_the_oracle_shows_enough() -> None:
    little = replace(GOOD, name="little", mean_x=1.1, p99_x=1.1, oracle_x=1.3)  # < 1.6x: the 1.5x target is moot
    assert passed(GOOD, little)[2:4] == [True, True]
    rich = replace(GOOD, name="rich", mean_x=1.4, p99_x=1.6, oracle_x=1.7)
    v = evaluate([GOOD, rich], CRITERIA)
    assert v[2].passed is False and v[2].misses == ("rich (1.40x)",) and v[3].passed is True
    no_oracle = replace(GOOD, oracle_x=None, share_mean=None, share_p99=None)
    assert passed(no_oracle)[2:6] == [None, None, None, None]  # applies to no scenario: neither


def test_criteria_headroom_share_is_an_average_over_scenarios_with_headroom() -> None:
    low = replace(GOOD, name="low", share_mean=0.5, share_p99=0.1)
    flat = replace(GOOD, name="flat", share_mean=None, share_p99=None)  # no headroom: left out of the average
    v = evaluate([GOOD, low, flat], CRITERIA)
    assert v[4].passed is False and v[4].met == "average 65% over 2" and v[4].misses == ("low (50%)",)
    assert v[5].passed is False and v[5].met == "average 35% over 2"
    high = replace(GOOD, name="high", share_mean=0.7, share_p99=0.9)
    v = evaluate([high, low], CRITERIA)
    assert v[4].passed is False and v[5].passed is True  # mean average 60% < 70%, P99 average 50% >= 50%


def test_criteria_cold_start_and_settle_after_shift() -> None:
    cold = replace(GOOD, name="cold", first_x=0.6)
    assert evaluate([GOOD, cold], CRITERIA)[6].misses == ("cold (0.60x)",)
    assert passed(GOOD)[7] is None  # no shift scenario
    slow = replace(GOOD, name="slow", shift=True, settle_s=150.0)
    never = replace(GOOD, name="never", shift=True, settle_s=math.inf)
    short = replace(GOOD, name="short", shift=True, settle_s=None)
    fast = replace(GOOD, name="fast", shift=True, settle_s=120.0)
    v = evaluate([fast, slow, never, short], CRITERIA)[7]
    assert v.passed is False and v.met == "1/4"
    assert v.misses == ("slow (150 s)", "never (never)", "short (not measured)")


# ------------------------------------------------------------------ one scenario's aggregate, built from runs --

SHIFT = Scenario(slug="s", cluster="homo_8a30", workload="shift_prefix_share", rate=10, duration_s=450,
                 seeds=(1, 2), baselines=("lmetric", "sglang_cache_aware"), learned="learned", families=(),
                 oracle="oracle", curve=False, shift_at_s=150.0)


def run(label: str, seed: int, levels: list[float], snapshots: list[dict] | None = None,
        fallback_windows: int = 0, scenario: Scenario = SHIFT) -> tuple[RunKey, RunData]:
    """A run whose TTFT (in seconds) is constant per 30 s window; its row's mean and P99 follow the series."""
    arrival, ttft_ms = curve(levels)
    ttft = ttft_ms / 1000.0
    kind = np.full(len(arrival), MODEL, dtype=np.int8)
    kind[:fallback_windows * 10] = FALLBACK
    stats = {f"ttft_p{q}_ms": float(np.percentile(ttft_ms, q)) for q in (50, 90, 99)}
    data = RunData({"policy": label, "seed": seed, "ttft_mean_ms": float(ttft_ms.mean()), **stats,
                    "e2e_mean_ms": 2 * float(ttft_ms.mean()), "prefix_hit_rate": 0.5, "load_share": {"A30": 1.0},
                    "completed": len(arrival)}, arrival, ttft, kind, snapshots or [])
    return RunKey(scenario, label, seed), data


def test_scenario_report_gathers_the_issue_11_figures() -> None:
    # 15 windows of 30 s; the shift at 150 s (window 5). lmetric is flat at 100 ms (then 200 after the shift);
    # learned starts at 200 ms for two windows (cold start), then 50, and after the shift is off for two windows
    # (400) before settling at 100: 60 s after the shift. The oracle (seed 1) is at 40 / 80.
    base = [100.0] * 5 + [200.0] * 10
    learned = [200.0, 200.0, 50.0, 50.0, 50.0, 400.0, 400.0] + [100.0] * 8
    runs = dict([
        run("lmetric", 1, base), run("lmetric", 2, base),
        run("sglang_cache_aware", 1, [x * 1.5 for x in base]), run("sglang_cache_aware", 2, [x * 1.5 for x in base]),
        run("learned", 1, learned, [{"at_s": 55.0, "validated": True}], fallback_windows=2),
        run("learned", 2, learned, [{"at_s": 10.0, "validated": False}, {"at_s": 60.0, "validated": True}],
            fallback_windows=2),
        run("oracle", 1, [40.0] * 5 + [80.0] * 10),
    ])
    r = scenario_report(runs, SHIFT, CRITERIA)
    assert r.homogeneous and r.learned.baseline == "lmetric" and r.requests == 150
    assert r.first_validated_s == [55.0, 60.0]
    assert r.model_share == pytest.approx(13 / 15)
    assert r.first_x == pytest.approx(0.5)  # first 60 s: 100 against 200
    mean_b, mean_l, mean_o = np.mean(base), np.mean(learned), np.mean([40.0] * 5 + [80.0] * 10)
    assert r.headroom is not None and r.headroom.share_mean == pytest.approx((mean_b - mean_l) / (mean_b - mean_o))
    assert r.x_settling is not None and r.x_settling.steady == pytest.approx(2.0)
    assert r.x_settling.settle_s == 60.0
    f = r.figures()
    assert f.shift and f.settle_s == 60.0 and f.first_x == r.first_x and f.p99_x == r.learned.worst_p99_x
    assert f.oracle_x == pytest.approx(mean_b / mean_o)
    verdict = evaluate([f], CRITERIA)
    assert verdict[6].passed is False  # cold start at 0.5x
    assert verdict[7].passed is True  # settled 60 s after the shift


def test_a_shift_scenario_too_short_to_settle_is_not_measured() -> None:
    # 150 s after the shift: fewer than eight windows.
    short = replace(SHIFT, duration_s=300, seeds=(1,), oracle=None)
    runs = dict([run("lmetric", 1, [100.0] * 10, scenario=short),
                 run("sglang_cache_aware", 1, [150.0] * 10, scenario=short),
                 run("learned", 1, [90.0] * 10, scenario=short)])
    r = scenario_report(runs, short, CRITERIA)
    assert r.x_settling is None and r.headroom is None
    assert math.isnan(r.warm_x)  # the learner never published a validated snapshot
    f = r.figures()
    assert f.shift and f.settle_s is None
    assert evaluate([f], CRITERIA)[7].misses == ("homo_8a30 / shift_prefix_share @ 10/s (not measured)",)


# ---------------------------------------------------------------------------------------- the write-up --

def shift_report() -> ScenarioReport:
    """One seed: lmetric has the best mean but one bad window (so sglang_cache_aware has the best tail), learned
    beats both flat, and the oracle is barely better than lmetric in mean (no mean headroom)."""
    one = replace(SHIFT, seeds=(1,))
    runs = dict([run("lmetric", 1, [420.0] + [130.0] * 14, scenario=one),
                 run("sglang_cache_aware", 1, [160.0] * 15, scenario=one),
                 run("learned", 1, [80.0] * 15, scenario=one), run("oracle", 1, [145.0] * 15, scenario=one)])
    return scenario_report(runs, one, CRITERIA)


def test_bench_command_reproduces_labelled_specs_with_their_parameters() -> None:
    specs = [PolicySpec("lmetric", "lmetric"), PolicySpec("lm", "learned", {"fallback": "lmetric"})]
    cmd = bench_command(SHIFT, specs, [1, 2], "out")
    assert "--policies lmetric,lm=learned" in cmd and "--seeds 1,2" in cmd and "--duration 450" in cmd
    assert """--policy-params '{"lm": {"fallback": "lmetric"}}'""" in cmd
    assert "--policy-params" not in bench_command(SHIFT, specs[:1], [1], "out")


def test_the_summary_shows_the_issue_11_columns_and_verdicts() -> None:
    r = shift_report()
    assert r.learned.baseline == "lmetric" and r.learned.tail_baseline == "sglang_cache_aware"
    assert r.headroom is not None and r.headroom.share_mean is None and r.headroom.share_p99 is not None
    specs = {p: PolicySpec(p, p) for p in ("lmetric", "sglang_cache_aware", "learned", "oracle")}
    campaign = Campaign(specs, ("lmetric", "sglang_cache_aware"), CRITERIA, (r.scenario,))
    verdicts = evaluate([r.figures()], CRITERIA)
    text = summary_markdown([r], campaign, verdicts, {"commit": "abcdef1234567", "dirty_files": ""}, 60.0, 1, "mlp")
    assert "Numbers from commit `abcdef1234`" in text
    line = next(line for line in text.splitlines() if line.startswith("| [homo_8a30"))
    cells = [c.strip() for c in line.split("|")[1:-1]]
    assert cells[2] == "lmetric" and cells[5] == "sglang_cache_aware: 2.00x (2.00x)"
    assert cells[6] == f"{r.headroom.oracle_x_mean:.2f}x / 1.10x"
    assert cells[7] == f"none / {r.headroom.share_p99:.0%}"
    assert cells[9] == "0 s"  # learned's x over lmetric is flat after the shift
    assert "| first 60 s of a cold start >= 0.97x the best baseline | PASS | 1/1 |" in text
    assert "| where the oracle shows >= 1.60x in mean: mean >= 1.50x | n/a |" in text
    assert "| after a shift, x back within 10% of steady in <= 120 s | PASS |" in text
    details = details_markdown([r], {}, Path("docs/results.md"), campaign, "mlp")
    assert "#### homo_8a30 / shift_prefix_share @ 10/s" in details
    assert "--policies lmetric,sglang_cache_aware,learned --out .run/bench/s\n" in details
    assert "--policies learned,oracle --out .run/bench/s-oracle" in details


def test_the_doc_regions_are_replaced_and_the_text_around_them_kept(tmp_path: Path) -> None:
    doc = tmp_path / "results.md"
    doc.write_text("# Results\n\nhand-written\n\n## Baselines\n\nkept\n")
    write_doc(doc, "S1\n", "D1\n")
    write_doc(doc, "S2\n", "D2\n")
    text = doc.read_text()
    assert "S2" in text and "D2" in text and "S1" not in text and "D1" not in text
    assert text.startswith("# Results\n\nhand-written\n\n## Learned routing")
    assert text.endswith("## Baselines\n\nkept\n")
    with pytest.raises(ValueError, match="lacks the markers"):
        replace_region("no markers", "summary", "x")
