"""Wire schemas: good messages round-trip, bad ones fail with a readable reason."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from lodestar.schemas import (
    SCHEMA_VERSION,
    InferenceRequest,
    InferenceResult,
    InvalidMessage,
    RoutedRequest,
    RoutingDecision,
    TelemetryEvent,
    WorkerState,
    decode,
)


def test_request_round_trip() -> None:
    req = InferenceRequest(prompt="hello world", session_id="s1")
    back = decode(InferenceRequest, req.to_bytes())
    assert back == req
    assert back.schema_version == SCHEMA_VERSION
    assert back.sampling.max_new_tokens == 128


def test_routed_request_round_trip() -> None:
    routed = RoutedRequest(
        request=InferenceRequest(input_ids=[1, 2, 3]),
        decision=RoutingDecision(worker_id="w0", policy="round_robin", features={"prompt_tokens": 3.0}),
    )
    assert decode(RoutedRequest, routed.to_bytes()) == routed


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        (b"not json", "invalid InferenceRequest"),
        (json.dumps({"request_id": "r"}).encode(), "exactly one of"),
        (json.dumps({"prompt": "a", "input_ids": [1]}).encode(), "exactly one of"),
        (json.dumps({"prompt": "a", "schema_version": 99}).encode(), "schema_version"),
        (json.dumps({"prompt": "a", "bogus": 1}).encode(), "bogus"),
        (json.dumps({"prompt": "a", "sampling": {"max_new_tokens": 0}}).encode(), "sampling.max_new_tokens"),
        (json.dumps({"prompt": "a", "sampling": {"max_new_tokens": "5"}}).encode(), "sampling.max_new_tokens"),
        (json.dumps({"input_ids": [1, -2]}).encode(), "input_ids.1"),
    ],
)
def test_bad_requests_have_clear_reasons(payload: bytes, fragment: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        decode(InferenceRequest, payload)
    assert fragment in info.value.reason


def test_result_rejects_negative_latency() -> None:
    with pytest.raises(InvalidMessage, match="ttft_ms"):
        decode(InferenceResult, json.dumps({"request_id": "r", "worker_id": "w", "status": "ok", "ttft_ms": -1.0}))


def test_telemetry_requires_known_status() -> None:
    decision = RoutingDecision(worker_id="w0", policy="learned").model_dump()
    body = {"request_id": "r", "decision": decision, "gpu_type": "H100", "status": "weird"}
    with pytest.raises(InvalidMessage, match="status"):
        decode(TelemetryEvent, json.dumps(body))


def test_worker_state_redis_round_trip() -> None:
    state = WorkerState(worker_id="w0", gpu_type="A30", topic="lodestar.worker.w0", running=3, draining=True)
    mapping = {k.encode(): v.encode() for k, v in state.to_redis().items()}
    back = WorkerState.from_redis(mapping)
    assert back.running == 3 and back.draining is True and back.gpu_type == "A30"


@pytest.mark.parametrize("field", ["recent_ttft_ms", "recent_output_tokens"])
@pytest.mark.parametrize("bad", ["inf", "nan", "-1", "many"])
def test_worker_state_averages_from_redis_are_finite_and_not_negative(field: str, bad: str) -> None:
    """A worker's advertised averages reach the TTFT estimate: a hash with one that is not a finite, non-negative
    number is unreadable (the registry then lists no such worker), and a good one round-trips."""
    state = WorkerState(worker_id="w0", gpu_type="A30", topic="lodestar.worker.w0", **{field: 182.5})
    mapping = state.to_redis()
    assert getattr(WorkerState.from_redis(mapping), field) == 182.5
    with pytest.raises(ValidationError, match=field):
        WorkerState.from_redis({**mapping, field: bad})
