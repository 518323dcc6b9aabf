"""Bounds on every input field: the wire contract's fixed ones (lodestar/schemas.py) and the deployment's
(lodestar/limits.py), each refused with a readable reason; and the arithmetic that keeps a routed copy
under the broker's limit by construction."""

from __future__ import annotations

import json
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from lodestar import tracing
from lodestar.features import FEATURE_NAMES
from lodestar.limits import ROUTED_RESERVE_BYTES, Limits, OversizedMessage, deadline_passed
from lodestar.schemas import (
    EPOCH_MS_MAX,
    InferenceRequest,
    InferenceResult,
    InvalidMessage,
    RoutedRequest,
    RoutingDecision,
    TelemetryEvent,
    decode,
)
from lodestar.settings import LimitsSettings, Settings

LIMITS = Limits(Settings())
ROOMY = Limits(Settings(limits={"max_message_bytes": 8 * 1_048_576}))  # the size check never binds first


def request(**fields: Any) -> bytes:
    return json.dumps({"prompt": "hello", **fields}).encode()


def raw(text: str) -> bytes:
    return text.encode()


@pytest.mark.parametrize(("payload", "fragment"), [
    (json.dumps({"request_id": "p1", "input_ids": [4294967296]}).encode(), "input_ids.0: Input should be less than"),
    (json.dumps({"input_ids": [2**31]}).encode(), "input_ids.0: Input should be less than or equal to 2147483647"),
    (json.dumps({"input_ids": [-1]}).encode(), "input_ids.0: Input should be greater than or equal to 0"),
    (json.dumps({"input_ids": [1] * 262_145}).encode(), "input_ids: List should have at most 262144 items"),
    (json.dumps({"input_ids": [1.5]}).encode(), "input_ids.0: Input should be a valid integer"),
    (request(prompt="x" * 1_000_001), "prompt: String should have at most 1000000 characters"),
    (request(request_id=""), "request_id: String should match pattern"),
    (request(request_id="x" * 129), "request_id: String should match pattern"),
    (request(request_id="has space"), "request_id: String should match pattern"),
    (request(request_id="new\nline"), "request_id: String should match pattern"),
    (request(session_id="é"), "session_id: String should match pattern"),
    (request(reply_to="not a topic"), "reply_to: String should match pattern"),
    (request(reply_to="t" * 250), "reply_to: String should match pattern"),
    (request(sampling={"stop": ["x"] * 17}), "sampling.stop: List should have at most 16 items"),
    (request(sampling={"stop": ["x" * 257]}), "sampling.stop.0: String should have at most 256 characters"),
    (request(sampling={"stop": [""]}), "sampling.stop.0: String should have at least 1 character"),
    (request(sampling={"max_new_tokens": 0}), "sampling.max_new_tokens"),
    (request(sampling={"max_new_tokens": 1_000_001}), "sampling.max_new_tokens"),
    (request(sampling={"temperature": 101.0}), "sampling.temperature"),
    (request(metadata={f"k{i}": "v" for i in range(33)}), "metadata: Dictionary should have at most 32 items"),
    (request(metadata={"k" * 65: "v"}), "metadata.kkkk"),
    (request(metadata={"": "v"}), "String should have at least 1 character"),
    (request(metadata={"k": "v" * 1025}), "metadata.k: String should have at most 1024 characters"),
    (request(metadata={"k": 1}), "metadata.k: Input should be a valid string"),
    (request(created_at=-1.0), "created_at: Input should be greater than or equal to 0"),
    (request(created_at=EPOCH_MS_MAX * 2), "created_at: Input should be less than or equal to"),
    (request(deadline_ms=1e300), "deadline_ms: Input should be less than or equal to"),
    (request(priority=2**31), "priority: Input should be less than or equal to 2147483647"),
    (request(priority=-(2**31) - 1), "priority: Input should be greater than or equal to -2147483648"),
    (raw('{"prompt": "x", "created_at": NaN}'), "created_at: Input should be a finite number"),
    (raw('{"prompt": "x", "deadline_ms": Infinity}'), "deadline_ms: Input should be a finite number"),
    (raw('{"prompt": "x", "sampling": {"temperature": NaN}}'), "sampling.temperature: Input should be a finite"),
    (raw('{"prompt": "x", "sampling": {"top_p": -Infinity}}'), "sampling.top_p: Input should be a finite"),
    (raw('{"prompt": "x", "created_at": 1e400}'), "created_at: Input should be a finite number"),
    (raw('{"prompt": "\\ud800"}'), "Invalid JSON"),
], ids=lambda v: v[:60].decode(errors="replace") if isinstance(v, bytes) else None)
def test_every_request_field_is_bounded(payload: bytes, fragment: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        ROOMY.decode_request(payload)
    assert fragment in info.value.reason


def test_the_bounds_admit_what_they_should() -> None:
    good = InferenceRequest(
        request_id="tenant-a:chat.42_x", input_ids=[0, LIMITS.max_token_id], session_id="s:1",
        reply_to="lodestar.reply.frontend-1", priority=-5, deadline_ms=EPOCH_MS_MAX, created_at=0.0,
        metadata={f"k{i}": "v" * 1024 for i in range(32)},
    )
    assert LIMITS.decode_request(good.to_bytes()) == good


def test_finite_numbers_only_in_every_message() -> None:
    decision = RoutingDecision(worker_id="w0", policy="p", features={"prompt_tokens": 1.0}).model_dump()
    decision["features"]["prompt_tokens"] = float("nan")
    event = {"request_id": "r", "decision": decision, "gpu_type": "H100", "status": "ok", "ttft_ms": 1.0}
    with pytest.raises(InvalidMessage, match="decision.features.prompt_tokens: Input should be a finite number"):
        decode(TelemetryEvent, json.dumps(event))
    with pytest.raises(InvalidMessage, match="ttft_ms: Input should be a finite number"):
        decode(InferenceResult, '{"request_id": "r", "worker_id": "w", "status": "ok", "ttft_ms": Infinity}')
    with pytest.raises(InvalidMessage, match="e2e_ms: Input should be less than or equal to 86400000"):
        decode(InferenceResult, '{"request_id": "r", "worker_id": "w", "status": "ok", "e2e_ms": 1e9}')


def test_the_size_is_checked_on_the_raw_bytes_before_parsing() -> None:
    huge = b"\xff" * (LIMITS.max_request_bytes + 1)  # not even JSON: refused for its size, unparsed
    with pytest.raises(InvalidMessage, match=f"over the {LIMITS.max_request_bytes}-byte limit"):
        LIMITS.decode_request(huge)
    assert LIMITS.max_request_bytes == 1_048_576 - ROUTED_RESERVE_BYTES
    with pytest.raises(InvalidMessage, match="empty message"):
        LIMITS.decode_request(b"")
    with pytest.raises(InvalidMessage, match="empty message"):
        LIMITS.decode_request(None)


def test_token_ids_beyond_the_models_vocabulary_are_refused() -> None:
    limits = Limits(Settings(limits={"max_token_id": 151_935}))
    limits.decode_request(json.dumps({"input_ids": [0, 151_935]}).encode())
    with pytest.raises(InvalidMessage, match="token id 151936, beyond limits.max_token_id=151935"):
        limits.decode_request(json.dumps({"input_ids": [5, 151_936]}).encode())
    with pytest.raises(InvalidMessage, match="token id 262144, beyond limits.max_token_id=262143"):
        LIMITS.decode_request(json.dumps({"input_ids": [262_144]}).encode())


@pytest.mark.parametrize(("topic", "refusal"), [
    ("lodestar.results", None),
    ("lodestar.reply.frontend-1", None),
    ("lodestar.reply.a.b_c-d", None),
    ("__consumer_offsets", "is a Kafka internal topic"),
    ("__transaction_state", "is a Kafka internal topic"),
    ("lodestar.requests", "is a Lodestar system topic"),
    ("lodestar.telemetry", "is a Lodestar system topic"),
    ("lodestar.dlq", "is a Lodestar system topic"),
    ("lodestar.worker.h100-0", "is a Lodestar system topic"),
    ("lodestar.replies", "is not an allowed reply topic"),
    ("lodestar.reply.", "is not an allowed reply topic"),
    ("other.results", "is not an allowed reply topic"),
    ("my.replies-1", "is not an allowed reply topic"),
])
def test_reply_topics_are_an_allowlist(topic: str, refusal: str | None) -> None:
    got = LIMITS.reply_topics.refusal(topic)
    assert (got is None) if refusal is None else (refusal in (got or ""))
    if refusal is not None:
        with pytest.raises(InvalidMessage, match="reply_to"):
            LIMITS.decode_request(request(reply_to=topic))


def test_the_reply_pattern_follows_the_prefix_and_never_opens_system_topics() -> None:
    limits = Limits(Settings(kafka={"topic_prefix": "t1."}, limits={"reply_to_pattern": ".*"}))
    assert limits.reply_topics.refusal("anything.at.all") is None
    for topic in ("t1.requests", "t1.worker.w0", "t1.telemetry", "t1.dlq", "__consumer_offsets"):
        assert limits.reply_topics.refusal(topic) is not None
    default = Limits(Settings(kafka={"topic_prefix": "t1."}))
    assert default.reply_topics.refusal("t1.reply.x") is None and default.reply_topics.refusal("t1xreply.x")
    assert default.reply_topics.refusal("lodestar.results") is not None
    with pytest.raises(ValueError, match="reply_to_pattern is not a regular expression"):
        LimitsSettings(reply_to_pattern="(unclosed")


def test_deadline_is_an_absolute_epoch_ms_time() -> None:
    now = 1_767_225_600_000.0
    assert deadline_passed(InferenceRequest(prompt="x"), now) is None
    assert deadline_passed(InferenceRequest(prompt="x", deadline_ms=now + 1), now) is None
    reason = deadline_passed(InferenceRequest(prompt="x", deadline_ms=now - 2500), now)
    assert reason is not None and reason.startswith("deadline exceeded") and "passed 2500 ms ago" in reason


def test_check_size_counts_key_and_headers() -> None:
    payload = b"x" * (LIMITS.max_message_bytes - 1000)
    LIMITS.check_size(payload, "it")
    with pytest.raises(OversizedMessage, match="over limits.max_message_bytes=1048576"):
        LIMITS.check_size(payload, "it", headers=[("baggage", b"b" * 1000)])


def hostile_record(value: bytes) -> ConsumerRecord:
    """A request record whose trace headers are as large as the propagators accept (8,192 characters of
    tracestate in at most 32 members, 8,192 bytes of baggage in pairs of at most 4,096)."""
    members = ",".join(f"k{i:02d}={'v' * 250}" for i in range(32))[:8192].rsplit(",", 1)[0]
    pairs = ",".join(f"key{i}={'v' * 4080}" for i in range(2))
    headers = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
               ("tracestate", members.encode()), ("baggage", pairs.encode())]
    return ConsumerRecord(topic="lodestar.requests", partition=0, offset=0, timestamp=0, timestamp_type=0,
                          key=None, value=value, checksum=None, serialized_key_size=0,
                          serialized_value_size=len(value), headers=headers)


def test_a_largest_request_routed_fits_the_broker_by_construction() -> None:
    """The arithmetic at ROUTED_RESERVE_BYTES: a request of the largest admitted size, written to grow most
    when re-serialized (every optional field left out, a number in short form), routed with the largest
    decision and the largest trace headers the propagators pass on, still fits max_message_bytes."""
    skeleton = b'{"created_at":1e12,"prompt":"' + b'"}'
    value = skeleton[:-2] + b"a" * (LIMITS.max_request_bytes - len(skeleton)) + b'"}'
    assert len(value) == LIMITS.max_request_bytes
    req = LIMITS.decode_request(value)
    decision = RoutingDecision(
        worker_id="w" * 200, policy="p" * 64, model_version=2**63 - 1,
        features={f"{name}{'_' * (64 - len(name))}": -1.2345678901234567e-300 for name in FEATURE_NAMES}
        | {f"extra{i:02d}{'_' * 57}": -1.2345678901234567e-300 for i in range(64 - len(FEATURE_NAMES))},
        predicted_ttft_ms=-1.2345678901234567e-300, explored=True, matched_prefix_tokens=2**31 - 1,
        dispatcher_id="d" * 256, decided_at=EPOCH_MS_MAX, attempt=10_000,
    )
    routed = RoutedRequest(request=req, decision=decision, origin="4294967295@18446744073709551615").to_bytes()
    mem = tracing.in_memory_tracing("limits")
    span = tracing.start_process_span(mem.tracer("dispatcher"), tracing.OP_ROUTE, hostile_record(value),
                                      request_id=req.request_id, group="g")
    headers = tracing.headers_for(span)
    span.end()
    header_bytes = sum(len(k) + len(v) for k, v in headers)
    assert len(routed) - len(value) < 10 * 1024  # decision + re-serialization growth: within the 9 KiB budgeted
    assert 7_900 < header_bytes < 8.3 * 1024  # the tracestate is carried on whole, within the propagator's cap
    key = req.request_id.encode()
    LIMITS.check_size(routed, "the routed request", key=key, headers=headers)
    size = DefaultRecordBatchBuilder.estimate_size_in_bytes(key, routed, headers)
    assert size <= LIMITS.max_message_bytes
