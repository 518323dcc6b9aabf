"""The results campaign's aggregation: best-baseline choice, per-seed ratios, the oracle gap, learning curves
and their settle time, on synthetic inputs."""

from __future__ import annotations

import importlib.util
import math
import sys
from types import ModuleType

import numpy as np
import pytest

from lodestar.settings import PROJECT_ROOT


@pytest.fixture(scope="module")
def campaign() -> ModuleType:
    path = PROJECT_ROOT / "scripts" / "results_campaign.py"
    spec = importlib.util.spec_from_file_location("results_campaign", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def row(policy: str, seed: int, mean: float, p99: float) -> dict:
    return {"policy": policy, "seed": seed, "ttft_mean_ms": mean, "ttft_p99_ms": p99}


ROWS = [
    row("least_request", 1, 100.0, 900.0), row("least_request", 2, 120.0, 1000.0),
    # lmetric is worse on seed 1 but better on average: the best baseline is chosen on the mean over seeds.
    row("lmetric", 1, 110.0, 800.0), row("lmetric", 2, 90.0, 600.0),
    row("learned", 1, 55.0, 400.0), row("learned", 2, 60.0, 600.0),
    row("oracle", 1, 50.0, 350.0),
]


def test_best_baseline_is_least_mean_over_seeds_among_those_that_ran(campaign: ModuleType) -> None:
    assert campaign.best_baseline(ROWS, ["least_request", "lmetric", "gpu_speed_queue"]) == "lmetric"
    assert campaign.best_baseline(ROWS, ["least_request"]) == "least_request"
    with pytest.raises(ValueError):
        campaign.best_baseline(ROWS, ["gpu_speed_queue"])


def test_per_seed_ratios_pair_runs_by_seed(campaign: ModuleType) -> None:
    assert campaign.per_seed_ratios(ROWS, "learned", "lmetric", "ttft_mean_ms") == pytest.approx([2.0, 1.5])
    # The oracle ran on seed 1 only: one ratio.
    assert campaign.per_seed_ratios(ROWS, "learned", "oracle", "ttft_mean_ms") == pytest.approx([50.0 / 55.0])


def test_compare_against_best_baseline_and_oracle(campaign: ModuleType) -> None:
    c = campaign.compare(ROWS, "learned", ["least_request", "lmetric"])
    assert c.baseline == "lmetric"
    assert c.mean_x == pytest.approx(1.75) and c.mean_x_min == pytest.approx(1.5)
    assert c.p99_x == pytest.approx((2.0 + 1.0) / 2) and c.p99_x_min == pytest.approx(1.0)
    assert c.oracle_gap == pytest.approx(1.1)
    no_oracle = campaign.compare([r for r in ROWS if r["policy"] != "oracle"], "learned", ["lmetric"])
    assert no_oracle.oracle_gap is None


def test_window_means_leave_empty_windows_nan(campaign: ModuleType) -> None:
    arrival = np.array([1.0, 2.0, 31.0, 95.0])
    values = np.array([10.0, 20.0, 30.0, 40.0])
    starts, means = campaign.window_means(arrival, values, 0.0, 120.0, 30.0)
    assert starts.tolist() == [0.0, 30.0, 60.0, 90.0]
    assert means[0] == 15.0 and means[1] == 30.0 and math.isnan(means[2]) and means[3] == 40.0


def curve(levels: list[float], window_s: float = 30.0, per_window: int = 10, start_s: float = 0.0):
    """Arrivals spread over consecutive windows, each window at a constant value."""
    arrival = np.concatenate([start_s + i * window_s + np.linspace(0, window_s, per_window, endpoint=False)
                              for i in range(len(levels))])
    return arrival, np.repeat(np.array(levels, dtype=np.float64), per_window)


def test_settle_time_of_a_learning_curve(campaign: ModuleType) -> None:
    # Cold start at 300 ms, then 150 and 120, then steady around 100 from the fourth window on.
    arrival, ttft = curve([300, 150, 120, 105, 100, 98, 102, 100, 99, 101])
    s = campaign.settle_time(arrival, ttft, start_s=0.0, steady_from_s=200.0, end_s=300.0)
    assert s.steady == pytest.approx(np.mean([100, 99, 101, 100]), rel=0.02)
    assert s.settle_s == 90.0


def test_a_late_excursion_pushes_the_settle_time_past_it(campaign: ModuleType) -> None:
    arrival, ttft = curve([300, 100, 100, 130, 100, 100, 100, 100, 100, 100])
    s = campaign.settle_time(arrival, ttft, start_s=0.0, steady_from_s=200.0, end_s=300.0)
    assert s.settle_s == 120.0


def test_settle_time_counts_from_the_shift(campaign: ModuleType) -> None:
    before, _ = curve([100] * 5)
    after_arrival, after = curve([400, 250, 210, 200, 200, 200, 200, 200, 200], start_s=150.0)
    arrival = np.concatenate([before, after_arrival])
    ttft = np.concatenate([np.full(len(before), 100.0), after])
    s = campaign.settle_time(arrival, ttft, start_s=150.0, steady_from_s=330.0, end_s=420.0)
    assert s.steady == pytest.approx(200.0)
    assert s.settle_s == 60.0  # the third window after the shift (210) is within 10% of 200


def test_a_curve_still_off_at_the_end_never_settles(campaign: ModuleType) -> None:
    arrival, ttft = curve([100, 100, 100, 100, 100, 100, 100, 100, 100, 200])
    s = campaign.settle_time(arrival, ttft, start_s=0.0, steady_from_s=200.0, end_s=300.0)
    assert s.settle_s is None


def test_settle_time_rejects_a_steady_stretch_outside_the_curve(campaign: ModuleType) -> None:
    arrival, ttft = curve([100, 100])
    with pytest.raises(ValueError):
        campaign.settle_time(arrival, ttft, start_s=0.0, steady_from_s=90.0, end_s=60.0)


def test_the_paired_x_curve_cancels_what_the_traffic_does_to_both(campaign: ModuleType) -> None:
    # The traffic has a heavy phase (windows 5-6) that doubles every policy's TTFT; learned is 2x better than
    # the baseline from the third window on. Its own curve never settles; the x curve settles at 60 s.
    phase = [1, 1, 1, 1, 1, 2, 2, 1, 1, 1]
    base_arrival, base = curve([100.0 * p for p in phase])
    arrival, learned = curve([100.0, 80.0] + [50.0 * p for p in phase[2:]])
    x = campaign.ratio_settle_time(base_arrival, base, arrival, learned, start_s=0.0, steady_from_s=200.0,
                                   end_s=300.0)
    assert x.steady == pytest.approx(2.0)
    assert x.settle_s == 60.0
    own = campaign.settle_time(arrival, learned, start_s=0.0, steady_from_s=200.0, end_s=300.0)
    assert own.settle_s == 210.0


def test_ratio_after_compares_the_same_arrival_stretch(campaign: ModuleType) -> None:
    base_arrival, base = curve([400, 100, 100])
    arrival, learned = curve([800, 50, 50])
    assert campaign.ratio_after(base_arrival, base, arrival, learned, 30.0) == pytest.approx(2.0)
    assert campaign.ratio_after(base_arrival, base, arrival, learned, 0.0) == pytest.approx(600 / 900)
    assert math.isnan(campaign.ratio_after(base_arrival, base, arrival, learned, 500.0))
