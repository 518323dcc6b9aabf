"""Dynamo KV cost, llm-d weighted scorers, LMetric, GPU-speed queue: hand-worked cases from their rules."""

from __future__ import annotations

import math
from collections import Counter

import pytest
from policy_views import cluster, request

from dispatcher.policies.baselines.dynamo import DynamoKVCost
from dispatcher.policies.baselines.llmd import LlmdWeighted
from dispatcher.policies.baselines.lmetric import LMetric
from dispatcher.policies.baselines.speed import GPUSpeedQueue
from dispatcher.policies.registry import make_policy
from lodestar.params import ParamsError


def dynamo_view():
    # Block size 16, prompt 160 tokens = 10 blocks.
    # w0: full match (10 blocks), 100 active blocks:          prefill 0,  decode 100 + 0
    # w1: no match, 320 pending prefill tokens, 20 active:    prefill 30, decode 20 + 10
    # w2: 5 blocks matched, 40 active blocks:                 prefill 5,  decode 40 + 5
    return cluster(
        3,
        matched=[160, 0, 80],
        pending_prefill_tokens=[0, 320, 0],
        kv_usage=[0.5, 0.1, 0.2],
        max_kv_tokens=[3200, 3200, 3200],
    )


def test_dynamo_logit_is_weighted_prefill_blocks_plus_decode_blocks() -> None:
    policy = DynamoKVCost()
    assert policy.logits(request(160), dynamo_view()).tolist() == pytest.approx([100, 60, 50])
    decision = policy.choose(request(160), dynamo_view())
    assert decision.index == 2
    assert decision.scores.tolist() == pytest.approx([-100, -60, -50])


@pytest.mark.parametrize(("weight", "expected"), [(0.0, 1), (1.0, 2), (10.0, 2), (20.0, 0)])
def test_dynamo_overlap_weight_trades_prefill_against_decode(weight: float, expected: int) -> None:
    # weight 0: [100, 30, 45]; 10: [100, 330, 95]; 20: [100, 630, 145].
    assert DynamoKVCost(overlap_score_weight=weight).choose(request(160), dynamo_view()).index == expected


def test_dynamo_block_size_can_be_set_apart_from_the_request() -> None:
    # B = 32: w0 overlap 5 blocks, active 50 -> 0 + 50; w1: (320 + 160) / 32 + 10 + 5 = 30;
    # w2: overlap 2 blocks -> (160 - 64) / 32 + 20 + 3 = 26.
    logits = DynamoKVCost(block_size=32).logits(request(160), dynamo_view())
    assert logits.tolist() == pytest.approx([50, 30, 26])


def test_dynamo_temperature_zero_breaks_exact_ties_at_random() -> None:
    view = cluster(3, kv_usage=[0.5, 0.0, 0.0], max_kv_tokens=[320, 320, 320])
    picks = {DynamoKVCost(seed=s).choose(request(160), view).index for s in range(30)}
    assert picks == {1, 2}


def test_dynamo_softmax_sampling_favours_low_cost_and_is_seeded() -> None:
    view = dynamo_view()  # logits 100, 60, 50: p proportional to exp(-logit / (max - min) / T)
    a, b = DynamoKVCost(temperature=0.5, seed=4), DynamoKVCost(temperature=0.5, seed=4)
    draws = [a.choose(request(160), view).index for _ in range(3000)]
    assert draws == [b.choose(request(160), view).index for _ in range(3000)]
    raw = [math.exp(-x / 50 / 0.5) for x in (100, 60, 50)]  # p = 0.075, 0.371, 0.554
    counts = Counter(draws)
    for i in range(3):
        assert counts[i] / 3000 == pytest.approx(raw[i] / sum(raw), abs=0.03)


def test_dynamo_softmax_with_equal_logits_is_uniform() -> None:
    policy = DynamoKVCost(temperature=1.0, seed=2)
    counts = Counter(policy.choose(request(160), cluster(4)).index for _ in range(4000))
    assert all(abs(counts[i] / 4000 - 0.25) < 0.04 for i in range(4))


def test_dynamo_rejects_negative_temperature() -> None:
    with pytest.raises(ParamsError, match="temperature: Input should be greater than or equal to 0"):
        make_policy("dynamo_kv_cost", {"temperature": -1.0})


def test_llmd_weighted_sum_of_queue_kv_and_prefix_scores() -> None:
    # queue [1, 0, 0.5], kv [0.5, 0.9, 0.1], prefix [0, 0, 1]: totals 2q + 2kv + 3p = [3, 1.8, 4.2].
    view = cluster(3, waiting=[0, 4, 2], kv_usage=[0.5, 0.1, 0.9], matched=[0, 0, 160])
    decision = LlmdWeighted().choose(request(160), view)
    assert decision.index == 2
    assert decision.scores.tolist() == pytest.approx([3.0, 1.8, 4.2])


def test_llmd_a_partial_prefix_loses_to_a_free_worker() -> None:
    # prefix [0, 0, 0.2]: totals [3, 1.8, 1.8].
    view = cluster(3, waiting=[0, 4, 2], kv_usage=[0.5, 0.1, 0.9], matched=[0, 0, 32])
    assert LlmdWeighted().choose(request(160), view).index == 0


def test_llmd_equal_queues_score_one_each() -> None:
    view = cluster(2, waiting=[3, 3], kv_usage=[0.2, 0.4])
    assert LlmdWeighted().total_scores(request(160), view).tolist() == pytest.approx([2 + 1.6, 2 + 1.2])


def test_llmd_prefix_score_caps_at_256_blocks() -> None:
    view = cluster(2, matched=[256 * 16, 0])
    scores = LlmdWeighted().total_scores(request(512 * 16), view)
    assert scores.tolist() == pytest.approx([2 + 2 + 3, 2 + 2])


def test_lmetric_cost_is_uncached_work_times_batch_size() -> None:
    # 1000 tokens = 62 blocks. w0: 31 blocks -> 50 % -> 500 hit: (1000 + 500) * (3 + 1) = 6000.
    # w1: no match: (0 + 1000) * (1 + 1) = 2000.  w2: full match: (4000 + 0) * (1 + 1) = 8000.
    view = cluster(3, matched=[496, 0, 992], pending_prefill_tokens=[1000, 0, 4000], inflight=[3, 1, 1])
    policy = LMetric()
    assert policy.costs(request(1000), view).tolist() == pytest.approx([6000, 2000, 8000])
    assert policy.choose(request(1000), view).index == 1


def test_lmetric_prefers_the_cache_when_loads_are_equal() -> None:
    view = cluster(2, matched=[0, 800], pending_prefill_tokens=[200, 200], inflight=[2, 2])
    assert LMetric().choose(request(1000), view).index == 1


def test_gpu_speed_queue_divides_queue_by_speed() -> None:
    # Speeds relative to A100: H100 989/312 = 3.17, A100 1, L4 121/312 = 0.39.
    view = cluster(3, gpu_types=["H100", "A100", "L4"], inflight=[6, 1, 0])  # 2.21, 2.0, 2.58
    assert GPUSpeedQueue().choose(request(64), view).index == 1
    view = cluster(3, gpu_types=["H100", "A100", "L4"], inflight=[5, 1, 0])  # 1.89, 2.0, 2.58
    assert GPUSpeedQueue().choose(request(64), view).index == 0


def test_gpu_speed_queue_idle_cluster_goes_to_the_fastest_gpu() -> None:
    view = cluster(3, gpu_types=["L4", "H100", "A100"])
    decision = GPUSpeedQueue().choose(request(64), view)
    assert decision.index == 1
    assert decision.scores.tolist() == pytest.approx([-312 / 121, -312 / 989, -1.0])
