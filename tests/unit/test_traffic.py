"""Phase tallies and TTFT summaries (what `lodestar up` reports), and its workload-to-request conversion."""

from __future__ import annotations

import numpy as np
import pytest

from app.demo import prompt_tokens, request_stream
from app.traffic import PhaseTally, summarize_ttft
from lodestar.hashing import token_block_hashes
from lodestar.schemas import InferenceResult, RoutingDecision, TelemetryEvent
from sim.workloads import load_workload, parse_workload_spec, workload_from_spec
from sim.workloads.request import WorkloadRequest


def test_summary_of_ttfts_matches_numpy_and_counts_errors() -> None:
    values = [10.0, 20.0, 30.0, 40.0, 1000.0]
    s = summarize_ttft(values, errors=2)
    assert (s.count, s.errors, s.mean, s.p50) == (5, 2, 220.0, 30.0)
    assert s.p90 == pytest.approx(np.percentile(values, 90)) and s.p99 == pytest.approx(np.percentile(values, 99))
    assert summarize_ttft([]).mean is None


def result(rid: str, worker: str, ttft: float | None, status: str = "ok") -> InferenceResult:
    return InferenceResult(request_id=rid, worker_id=worker, status=status, ttft_ms=ttft)  # type: ignore[arg-type]


def event(rid: str, policy: str, version: int, dispatcher: str, explored: bool = False) -> TelemetryEvent:
    decision = RoutingDecision(worker_id="w", policy=policy, model_version=version, dispatcher_id=dispatcher,
                               explored=explored)
    return TelemetryEvent(request_id=rid, decision=decision, gpu_type="H100", status="ok")


def test_tally_counts_errors_shares_and_decisions() -> None:
    tally = PhaseTally("p", gpu_of={"h100-0": "H100", "h100-1": "H100", "l4-0": "L4"})
    tally.sent += ["a", "b", "c", "d", "e"]
    tally.add_result(result("a", "h100-0", 10.0))
    tally.add_result(result("b", "h100-1", 30.0))
    tally.add_result(result("c", "l4-0", 200.0))
    tally.add_result(result("d", "l4-0", None, status="error"))
    assert (tally.completed, tally.errors, tally.in_flight) == (4, 1, 1)
    tally.unanswered.append("e")
    assert (tally.errors, tally.in_flight) == (2, 0)
    assert tally.gpu_shares() == {"H100": 0.5, "L4": 0.5}
    assert tally.ttft().count == 3 and tally.ttft().mean == pytest.approx(80.0) and tally.ttft().errors == 2
    tally.add_event(event("a", "learned", 3, "d1"))
    tally.add_event(event("a", "learned", 4, "d1"))  # a duplicate delivery keeps the first
    tally.add_event(event("b", "learned/gpu_speed_queue", 3, "d2", explored=True))
    assert tally.policy_counts() == {"learned": 1, "learned/gpu_speed_queue+explore": 1}
    assert tally.model_versions() == {3: 2} and tally.dispatcher_counts() == {"d1": 1, "d2": 1}


def chain_request(rid: str, hashes: tuple[int, ...], prompt_len: int) -> WorkloadRequest:
    return WorkloadRequest(rid, 0.0, prompt_len, hashes, 32, 8)


def test_prompt_tokens_keep_shared_prefixes_shared_and_the_rest_apart() -> None:
    a = prompt_tokens(chain_request("r0", (11, 12, 13), 100), "s")
    b = prompt_tokens(chain_request("r1", (11, 12, 99), 100), "s")
    assert len(a) == len(b) == 100
    assert a[:64] == b[:64] and a[64:96] != b[64:96] and a[96:] != b[96:]
    assert a == prompt_tokens(chain_request("r0", (11, 12, 13), 100), "s")  # deterministic
    hashes_a, hashes_b = token_block_hashes(a, 16), token_block_hashes(b, 16)
    assert hashes_a[:4] == hashes_b[:4] and hashes_a[4] != hashes_b[4]  # what the router will see


def test_request_stream_is_the_workloads_first_seconds_deterministic_in_the_seed() -> None:
    work = workload_from_spec(parse_workload_spec({"kind": "shared_prefix", "num_groups": 2, "system_prompt_len": 64,
                                                   "question_len": 16, "output_len": 8, "rate": 20.0}))
    first = request_stream(work, seed=1, seconds=2.0, id_prefix="x")
    again = request_stream(work, seed=1, seconds=2.0, id_prefix="y")
    other = request_stream(work, seed=2, seconds=2.0, id_prefix="x")
    assert 20 <= len(first) <= 60 and all(t.at_s < 2.0 for t in first)
    assert [t.request.input_ids for t in first] == [t.request.input_ids for t in again]
    assert [t.request.input_ids for t in first] != [t.request.input_ids for t in other]
    assert first[0].request.request_id == "x-r0" and first[0].request.sampling.max_new_tokens <= 8


def test_the_demo_files_load() -> None:
    from app.commands.up import DEFAULT_CLUSTER, DEFAULT_WORKLOAD
    from sim.cluster import read_cluster

    engines = read_cluster(DEFAULT_CLUSTER).expand()
    assert len(engines) == 4 and len({e.gpu for e in engines}) == 2
    stream = request_stream(load_workload(DEFAULT_WORKLOAD), seed=1, seconds=10.0, id_prefix="d")
    assert stream and all(len(t.request.input_ids or []) <= 1024 + 128 for t in stream)
