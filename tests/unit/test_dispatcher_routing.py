"""Batch routing: in-batch view updates, prefix matches created by the batch, decisions on the wire."""

from __future__ import annotations

import numpy as np
import pytest

from dispatcher.policies.registry import make_policy
from dispatcher.prefix_index import InMemoryPrefixIndex
from dispatcher.routing import CHARS_PER_TOKEN, BatchRouter, describe
from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.features import FEATURE_NAMES, candidate_matrix, from_dict
from lodestar.hashing import text_block_hashes, token_block_hashes
from lodestar.schemas import InferenceRequest
from lodestar.settings import PrefixSettings

PREFIX = PrefixSettings(tokens_per_block=4, chars_per_block=8)


class PrefixThenLeastLoaded:
    """Longest match wins; ties go to the fewest in-flight, then the lowest index."""

    name = "test_prefix_then_load"

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        order = np.lexsort((np.arange(view.size), view.inflight, -view.matched_prefix_tokens))
        i = int(order[0])
        return Decision(index=i, worker_id=view.worker_ids[i], policy=self.name, predicted_ttft_ms=12.5,
                        model_version=3)


def idle_view(n: int) -> ClusterView:
    return ClusterView.empty_like([f"w{i}" for i in range(n)], ["H100"] * n)


def req(ids: list[int]) -> InferenceRequest:
    return InferenceRequest(input_ids=ids)


def test_describe_token_prompt_uses_token_blocks() -> None:
    r = req(list(range(10)))
    info = describe(r, PREFIX)
    assert info.prompt_tokens == 10
    assert info.block_hashes == tuple(token_block_hashes(list(range(10)), 4))
    assert len(info.block_hashes) == 2 and info.tokens_per_block == 4


def test_describe_text_prompt_uses_char_blocks() -> None:
    text = "x" * 30
    info = describe(InferenceRequest(prompt=text), PREFIX)
    assert info.block_hashes == tuple(text_block_hashes(text, 8))
    assert info.prompt_tokens == -(-30 // CHARS_PER_TOKEN)
    assert info.tokens_per_block == 8 // CHARS_PER_TOKEN


def test_in_batch_load_spreads_requests() -> None:
    requests = [req([i * 100 + k for k in range(8)]) for i in range(6)]
    infos = [describe(r, PREFIX) for r in requests]
    view = idle_view(3)
    plan = BatchRouter(PrefixThenLeastLoaded(), "d1").route(requests, infos, np.zeros((6, 3)), view)
    chosen = [r.decision.worker_id for r in plan.routed]
    assert sorted(chosen) == ["w0", "w0", "w1", "w1", "w2", "w2"]
    assert view.inflight.tolist() == [2.0, 2.0, 2.0]
    assert view.pending_prefill_tokens.sum() == 6 * 8


def test_batch_sees_prefixes_created_by_earlier_requests() -> None:
    shared = list(range(12))
    requests = [req(shared + [1000 + i, 2000 + i, 3000 + i, 4000 + i]) for i in range(3)]
    infos = [describe(r, PREFIX) for r in requests]
    plan = BatchRouter(PrefixThenLeastLoaded(), "d1").route(requests, infos, np.zeros((3, 2)), idle_view(2))
    assert [r.decision.worker_id for r in plan.routed] == ["w0", "w0", "w0"]
    assert [r.decision.matched_prefix_tokens for r in plan.routed] == [0, 12, 12]
    assert [r.uncached_tokens for r in plan.routed] == [16, 4, 4]
    assert plan.inserts == {"w0": [i.block_hashes for i in infos]}


def test_stored_matches_are_used_and_extended() -> None:
    shared = list(range(16))
    first, second = req(shared), req(shared + [99, 98, 97, 96])
    infos = [describe(first, PREFIX), describe(second, PREFIX)]
    matched = np.array([[0, 2], [0, 2]])  # the index holds 2 leading blocks on w1
    plan = BatchRouter(PrefixThenLeastLoaded(), "d1").route([first, second], infos, matched, idle_view(2))
    assert [r.decision.worker_id for r in plan.routed] == ["w1", "w1"]
    # the first request brought blocks 2 and 3 to w1, so the second matches all 4 shared blocks
    assert [r.decision.matched_prefix_tokens for r in plan.routed] == [8, 16]


def test_matched_tokens_leave_at_least_one_token_to_compute() -> None:
    r = req(list(range(8)))
    plan = BatchRouter(PrefixThenLeastLoaded(), "d1").route([r], [describe(r, PREFIX)], np.array([[2]]),
                                                             idle_view(1))
    assert plan.routed[0].decision.matched_prefix_tokens == 7
    assert plan.routed[0].uncached_tokens == 1


def test_decision_carries_features_of_the_chosen_worker_and_policy_outputs() -> None:
    r = req(list(range(8)))
    info = describe(r, PREFIX)
    view = idle_view(2)
    view.running[:] = [5, 0]
    rows = candidate_matrix(info, view)
    plan = BatchRouter(PrefixThenLeastLoaded(), "disp-7").route([r], [info], np.zeros((1, 2)), view,
                                                                 attempts=[2])
    d = plan.routed[0].decision
    assert set(d.features) == set(FEATURE_NAMES)
    assert d.worker_id == "w0"
    np.testing.assert_array_equal(from_dict(d.features), rows[0])
    assert not np.array_equal(from_dict(d.features), rows[1])
    assert (d.policy, d.model_version, d.predicted_ttft_ms, d.dispatcher_id, d.attempt) == (
        "test_prefix_then_load", 3, 12.5, "disp-7", 2)


def test_misaligned_inputs_are_rejected() -> None:
    r = req(list(range(8)))
    with pytest.raises(ValueError, match="line up"):
        BatchRouter(PrefixThenLeastLoaded(), "d").route([r], [describe(r, PREFIX)], np.zeros((1, 3)),
                                                         idle_view(2))
    with pytest.raises(ValueError, match="no worker"):
        BatchRouter(PrefixThenLeastLoaded(), "d").route([r], [describe(r, PREFIX)], np.zeros((1, 0)),
                                                         idle_view(0))


def route_with_index(router: BatchRouter, index: InMemoryPrefixIndex, requests: list[InferenceRequest],
                     view: ClusterView, now: float) -> list[str]:
    """What the service does per batch, with the in-memory store in place of Redis."""
    infos = [describe(r, PREFIX) for r in requests]
    matched = np.stack([index.match(i.block_hashes, view.worker_ids) for i in infos])
    plan = router.route(requests, infos, matched, view)
    for wid, chains in plan.inserts.items():
        for chain in chains:
            index.insert(wid, chain, now)
    return [r.decision.worker_id for r in plan.routed]


def test_consecutive_batches_follow_the_prefix_index() -> None:
    index = InMemoryPrefixIndex(capacity_blocks=1000)
    router = BatchRouter(PrefixThenLeastLoaded(), "d1")
    doc_a, doc_b = list(range(32)), list(range(500, 532))
    first = route_with_index(router, index, [req(doc_a + [1]), req(doc_b + [2])], idle_view(3), 1.0)
    assert first == ["w0", "w1"]
    # a later batch: each follow-up goes where its document is cached, whatever the order
    second = route_with_index(router, index, [req(doc_b + [3]), req(doc_a + [4]), req([7] * 40)], idle_view(3), 2.0)
    assert second == ["w1", "w0", "w2"]


def test_a_registered_baseline_routes_a_batch() -> None:
    requests = [req([i] * 40) for i in range(8)]
    infos = [describe(r, PREFIX) for r in requests]
    view = idle_view(4)
    plan = BatchRouter(make_policy("least_request"), "d1").route(requests, infos, np.zeros((8, 4)), view)
    assert sorted(r.decision.worker_id for r in plan.routed) == ["w0", "w0", "w1", "w1", "w2", "w2", "w3", "w3"]
    assert all(r.decision.policy == "least_request" for r in plan.routed)


class FailsOnLongPrompts(PrefixThenLeastLoaded):
    """Raises for one kind of request, as a policy with a bug would; decides the others normally."""

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        if request.prompt_tokens > 100:
            raise OverflowError("this request breaks the policy")
        return super().choose(request, view)


class PredictsNonsense(PrefixThenLeastLoaded):
    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        chosen = super().choose(request, view)
        return Decision(index=chosen.index, worker_id=chosen.worker_id, policy=self.name,
                        predicted_ttft_ms=float("nan"))


def test_one_request_that_fails_to_route_is_set_aside_and_the_others_are_routed() -> None:
    requests = [req([1] * 8), req([2] * 200), req([3] * 8), req([4] * 300), req([5] * 8)]
    infos = [describe(r, PREFIX) for r in requests]
    view = idle_view(2)
    plan = BatchRouter(FailsOnLongPrompts(), "d1").route(requests, infos, np.zeros((5, 2)), view)
    assert [r.index for r in plan.routed] == [0, 2, 4]
    assert [r.request for r in plan.routed] == [requests[0], requests[2], requests[4]]
    assert [(f.index, f.stage, type(f.error)) for f in plan.failed] == [(1, "route", OverflowError),
                                                                        (3, "route", OverflowError)]
    assert view.inflight.sum() == 3  # the failed requests left the view untouched
    assert sum(len(chains) for chains in plan.inserts.values()) == 3


def test_a_non_finite_prediction_is_no_prediction() -> None:
    r = req([1] * 8)
    plan = BatchRouter(PredictsNonsense(), "d1").route([r], [describe(r, PREFIX)], np.zeros((1, 1)), idle_view(1))
    assert not plan.failed and plan.routed[0].decision.predicted_ttft_ms is None
