"""SGLang cache_aware, AIBrix prefix-cache and prefix-cache-preble: hand-worked cases from their rules."""

from __future__ import annotations

import pytest
from policy_views import cluster, request

from dispatcher.policies.baselines.aibrix import AIBrixPrefixCache, AIBrixPrefixLoad, preble_prefill_time_s
from dispatcher.policies.baselines.sglang import SGLangCacheAware

# SGLang cache_aware, defaults cache_threshold 0.3, balance_abs_threshold 64, balance_rel_threshold 1.5.


def test_sglang_balanced_routes_to_the_longest_match() -> None:
    view = cluster(3, inflight=[10, 12, 11], matched=[0, 800, 400])
    decision = SGLangCacheAware().choose(request(1000), view)
    assert decision.index == 1
    assert decision.scores.tolist() == pytest.approx([0.0, 0.8, 0.4])


def test_sglang_imbalanced_beyond_both_thresholds_routes_to_min_load_despite_a_full_match() -> None:
    # max - min = 80 > 64 and 100 > 1.5 * 20 = 30.
    view = cluster(3, inflight=[100, 20, 30], matched=[1000, 0, 0])
    decision = SGLangCacheAware().choose(request(1000), view)
    assert decision.index == 1
    assert decision.scores.tolist() == [-100, -20, -30]


def test_sglang_absolute_gap_alone_is_not_imbalance() -> None:
    # max - min = 70 > 64 but 300 <= 1.5 * 230 = 345: balanced, so the match decides.
    view = cluster(2, inflight=[300, 230], matched=[900, 0])
    assert SGLangCacheAware().choose(request(1000), view).index == 0


def test_sglang_relative_gap_alone_is_not_imbalance() -> None:
    # 10 > 1.5 * 2 but max - min = 8 <= 64.
    view = cluster(2, inflight=[10, 2], matched=[600, 0])
    assert SGLangCacheAware().choose(request(1000), view).index == 0


def test_sglang_low_match_rate_routes_to_the_first_min_load_worker() -> None:
    view = cluster(3, inflight=[5, 3, 3], matched=[250, 0, 0])  # 0.25 <= 0.3
    assert SGLangCacheAware().choose(request(1000), view).index == 1


def test_sglang_match_rate_must_exceed_the_threshold_strictly() -> None:
    view = cluster(2, inflight=[5, 3], matched=[300, 0])  # exactly 0.3
    assert SGLangCacheAware().choose(request(1000), view).index == 1
    view = cluster(2, inflight=[5, 3], matched=[304, 0])
    assert SGLangCacheAware().choose(request(1000), view).index == 0


def test_sglang_equal_longest_matches_go_to_the_less_loaded_holder() -> None:
    view = cluster(3, inflight=[9, 4, 1], matched=[640, 640, 0])
    assert SGLangCacheAware().choose(request(1000), view).index == 1


def test_sglang_thresholds_are_configurable() -> None:
    view = cluster(2, inflight=[12, 4], matched=[900, 0])  # gap 8 > 5 and 12 > 2 * 4
    policy = SGLangCacheAware(cache_threshold=0.5, balance_abs_threshold=5, balance_rel_threshold=2.0)
    assert policy.choose(request(1000), view).index == 1
    view = cluster(2, inflight=[4, 4], matched=[400, 0])  # balanced, 0.4 <= 0.5
    assert policy.choose(request(1000), view).index == 0  # first of the equal minimum loads


def test_sglang_load_is_the_outstanding_request_count() -> None:
    # In flight lags what the engine reports on w0 (90 running): that imbalance must be seen.
    view = cluster(2, inflight=[10, 10], running=[90, 10], matched=[1000, 0])
    assert SGLangCacheAware().choose(request(1000), view).index == 1


# AIBrix prefix-cache, defaults imbalance abs count 8, standard deviation factor 1.


def test_aibrix_prefix_cache_prefers_the_higher_match_within_the_load_bound() -> None:
    # 10 blocks; percents [0, 60, 60, 30]; loads mean 5, sample std 0.816: bound 5.82.
    view = cluster(4, inflight=[4, 5, 6, 5], matched=[0, 96, 96, 48])
    decision = AIBrixPrefixCache().choose(request(160), view)
    assert decision.index == 1  # 60 % at load 5 beats 60 % at load 6
    assert decision.scores[1] == 60 and decision.scores[2] == float("-inf")


def test_aibrix_prefix_cache_skips_matches_above_mean_plus_std() -> None:
    view = cluster(4, inflight=[4, 5, 6, 5], matched=[0, 0, 128, 48])  # w2: 80 % at load 6 > 5.82
    assert AIBrixPrefixCache().choose(request(160), view).index == 3


def test_aibrix_prefix_cache_imbalance_restricts_matching_to_min_load_workers() -> None:
    # max - min = 17 > 8: only w1 and w2 (load 3) are candidates; w0's full match is ignored.
    view = cluster(4, inflight=[20, 3, 3, 10], matched=[160, 0, 32, 0])
    assert AIBrixPrefixCache().choose(request(160), view).index == 2


def test_aibrix_prefix_cache_without_match_falls_back_to_least_request() -> None:
    view = cluster(3, inflight=[4, 2, 6])
    assert AIBrixPrefixCache().choose(request(160), view).index == 1
    view = cluster(4, inflight=[20, 3, 3, 10], matched=[160, 0, 0, 0])
    picks = {AIBrixPrefixCache(seed=s).choose(request(160), view).index for s in range(30)}
    assert picks == {1, 2}


def test_aibrix_prefix_cache_match_percent_is_an_integer() -> None:
    # 300 blocks: 1 and 2 matched blocks are both 0 % (integer division), so load decides.
    view = cluster(2, inflight=[0, 1], matched=[16, 32])
    assert AIBrixPrefixCache().choose(request(300 * 16), view).index == 0
    view = cluster(2, inflight=[0, 1], matched=[16, 64])  # 3 blocks = 1 %
    assert AIBrixPrefixCache().choose(request(300 * 16), view).index == 1


# AIBrix prefix-cache-preble: match threshold 0.5, window 3 min, decoding length 45, 0.15 s/token.


def test_preble_prefill_time_follows_aibrix_v100_profile() -> None:
    # linear(1000) = (0.27106428 * 1000 + 10.52444263) ms; attention(context 2000, 1000 unique) =
    # (4.65e-4 * 2000 + 0.398) / 2 ms; no quadratic term below 4096 tokens; all divided by 0.9.
    expected = ((0.27106428 * 1000 + 10.52444263) + (4.65e-4 * 2000 + 0.398) / 2) / 1000 / 0.9
    assert preble_prefill_time_s(1000, 2000) == pytest.approx(expected)
    assert preble_prefill_time_s(100, 500) == pytest.approx((55.0 + 0.80) / 1000 / 0.9)


def test_preble_exploits_a_long_match_and_spreads_by_windowed_request_count() -> None:
    policy = AIBrixPrefixLoad()
    view = cluster(3, matched=[80, 80, 0])  # ratio 0.8 > 0.5; w0 and w1 hold the longest match
    first = policy.choose(request(100), view).index
    second = policy.choose(request(100), view).index
    assert {first, second} == {0, 1}
    third = policy.choose(request(100), cluster(3, matched=[80, 0, 0])).index
    assert third == 0


def test_preble_explores_by_lowest_windowed_cost() -> None:
    policy = AIBrixPrefixLoad()
    view = cluster(3)  # no match: every choice is by windowed cost, first on a tie
    assert [policy.choose(request(1000), view).index for _ in range(4)] == [0, 1, 2, 0]


def test_preble_costs_leave_the_window() -> None:
    policy = AIBrixPrefixLoad(window_s=180)
    assert policy.choose(request(1000), cluster(3, now_ms=0)).index == 0
    assert policy.choose(request(1000), cluster(3, now_ms=1000)).index == 1
    assert policy.choose(request(1000), cluster(3, now_ms=181_000)).index == 0  # w0's record expired


def test_preble_cheaper_requests_weigh_less() -> None:
    policy = AIBrixPrefixLoad()
    policy.choose(request(4000), cluster(2, now_ms=0))  # w0: a long uncached prompt
    policy.choose(request(100), cluster(2, now_ms=1))  # w1: a short one
    assert policy.choose(request(1000), cluster(2, now_ms=2)).index == 1


def test_preble_imbalance_filter_applies_before_matching() -> None:
    policy = AIBrixPrefixLoad()
    view = cluster(3, inflight=[20, 3, 3], matched=[90, 0, 60])  # w0 excluded (load 20 - 3 > 8)
    assert policy.choose(request(100), view).index == 2


def test_preble_long_match_held_only_by_excluded_workers_means_explore() -> None:
    policy = AIBrixPrefixLoad()
    view = cluster(3, inflight=[20, 3, 3], matched=[90, 0, 0])
    decision = policy.choose(request(100), view)
    assert decision.index == 1 and decision.scores[0] == float("-inf")
