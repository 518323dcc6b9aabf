"""Tracing: W3C context through Kafka headers, one trace across producer and consumers, the learner's link,
GenAI and routing attributes, exporter selection from settings and OTEL_* variables."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

from lodestar import tracing
from lodestar.schemas import RoutingDecision, SamplingParams
from lodestar.settings import TelemetrySettings

OTEL_VARS = (
    "OTEL_TRACES_EXPORTER",
    "OTEL_SDK_DISABLED",
    "OTEL_SERVICE_NAME",
    "OTEL_RESOURCE_ATTRIBUTES",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_PROTOCOL",
    "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
)


@pytest.fixture(autouse=True)
def _no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in OTEL_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def mem() -> tracing.InMemoryTracing:
    return tracing.in_memory_tracing()


def record(topic: str, headers: tracing.Headers, *, key: bytes | None = b"k", offset: int = 7) -> ConsumerRecord:
    return ConsumerRecord(
        topic=topic, partition=3, offset=offset, timestamp=0, timestamp_type=0, key=key, value=b"{}",
        checksum=None, serialized_key_size=len(key or b""), serialized_value_size=2, headers=headers,
    )


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> ReadableSpan:
    matches = [s for s in spans if s.name == name]
    assert len(matches) == 1, [s.name for s in spans]
    return matches[0]


def test_inject_extract_round_trip_keeps_trace_and_parent_span(mem: tracing.InMemoryTracing) -> None:
    tracer = mem.tracer("client")
    with tracer.start_as_current_span("producer") as span:
        headers = tracing.inject_headers()
    sent = span.get_span_context()
    assert all(isinstance(k, str) and isinstance(v, bytes) for k, v in headers)
    assert "traceparent" in dict(headers)

    received = trace.get_current_span(tracing.extract_context(headers)).get_span_context()
    assert received.trace_id == sent.trace_id
    assert received.span_id == sent.span_id
    assert received.is_remote


def test_extract_ignores_header_name_case_and_other_headers(mem: tracing.InMemoryTracing) -> None:
    span = mem.tracer("client").start_span("producer")
    headers = [("x-other", b"1")] + [(k.upper(), v) for k, v in tracing.headers_for(span)]
    received = trace.get_current_span(tracing.extract_context(headers)).get_span_context()
    assert received.trace_id == span.get_span_context().trace_id


def test_headers_without_context_extract_to_no_parent() -> None:
    for headers in (None, [], [("x-other", b"1")], [("traceparent", b"garbage")]):
        assert not trace.get_current_span(tracing.extract_context(headers)).get_span_context().is_valid


def test_one_request_one_trace_across_client_dispatcher_worker(mem: tracing.InMemoryTracing) -> None:
    client, dispatcher, worker = mem.tracer("client"), mem.tracer("dispatcher"), mem.tracer("worker")

    send = tracing.start_send_span(client, "lodestar.requests", request_id="r1", key="s1")
    to_dispatcher = tracing.headers_for(send)
    send.end()

    route = tracing.start_process_span(
        dispatcher, tracing.OP_ROUTE, record("lodestar.requests", to_dispatcher), request_id="r1", group="g"
    )
    decision = RoutingDecision(worker_id="h100-0", policy="learned", model_version=4, predicted_ttft_ms=81.5,
                               explored=True, matched_prefix_tokens=512, dispatcher_id="d1")
    tracing.set_decision_attributes(route, decision)
    to_worker = tracing.headers_for(route)
    route.end()

    serve = tracing.start_process_span(worker, tracing.OP_SERVE, record("lodestar.worker.h100-0", to_worker),
                                       request_id="r1")
    with trace.use_span(serve, end_on_exit=True):
        gen = tracing.start_generate_span(worker, model="llama-3.1-8b", worker_id="h100-0",
                                          sampling=SamplingParams(max_new_tokens=64))
        tracing.record_first_token(gen, 0.081)
        tracing.record_usage(gen, input_tokens=600, output_tokens=64, cached_tokens=512, finish_reason="length")
        gen.end()

    spans = mem.exporter.get_finished_spans()
    assert len({s.context.trace_id for s in spans}) == 1
    s_send = by_name(spans, "send lodestar.requests")
    s_route = by_name(spans, "route lodestar.requests")
    s_serve = by_name(spans, "serve lodestar.worker.h100-0")
    s_gen = by_name(spans, "text_completion llama-3.1-8b")
    assert s_send.parent is None and s_send.kind is SpanKind.PRODUCER
    assert s_route.parent.span_id == s_send.context.span_id and s_route.kind is SpanKind.CONSUMER
    assert s_serve.parent.span_id == s_route.context.span_id
    assert s_gen.parent.span_id == s_serve.context.span_id and s_gen.kind is SpanKind.CLIENT

    assert s_send.attributes[tracing.MESSAGING_SYSTEM] == "kafka"
    assert s_send.attributes[tracing.MESSAGING_OPERATION_TYPE] == "send"
    assert s_route.attributes[tracing.MESSAGING_DESTINATION_NAME] == "lodestar.requests"
    assert s_route.attributes[tracing.MESSAGING_OPERATION_TYPE] == "process"
    assert s_route.attributes[tracing.MESSAGING_KAFKA_OFFSET] == 7
    assert s_route.attributes[tracing.MESSAGING_CONSUMER_GROUP_NAME] == "g"
    assert s_route.attributes[tracing.ATTR_REQUEST_ID] == "r1"
    assert s_route.attributes[tracing.ATTR_POLICY] == "learned"
    assert s_route.attributes[tracing.ATTR_WORKER_ID] == "h100-0"
    assert s_route.attributes[tracing.ATTR_MODEL_VERSION] == 4
    assert s_route.attributes[tracing.ATTR_PREDICTED_TTFT_MS] == 81.5
    assert s_route.attributes[tracing.ATTR_MATCHED_PREFIX_TOKENS] == 512
    assert s_route.attributes[tracing.ATTR_EXPLORED] is True

    assert s_gen.attributes[tracing.GEN_AI_SYSTEM] == "sglang"
    assert s_gen.attributes[tracing.GEN_AI_REQUEST_MODEL] == "llama-3.1-8b"
    assert s_gen.attributes[tracing.GEN_AI_REQUEST_MAX_TOKENS] == 64
    assert s_gen.attributes[tracing.GEN_AI_USAGE_INPUT_TOKENS] == 600
    assert s_gen.attributes[tracing.GEN_AI_USAGE_OUTPUT_TOKENS] == 64
    assert s_gen.attributes[tracing.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS] == 512
    assert s_gen.attributes[tracing.GEN_AI_RESPONSE_FINISH_REASONS] == ("length",)
    assert [e.name for e in s_gen.events] == [tracing.EVENT_FIRST_TOKEN]


def test_learner_span_is_linked_not_parented(mem: tracing.InMemoryTracing) -> None:
    worker, learner = mem.tracer("worker"), mem.tracer("learner")
    serve_a = worker.start_span("serve a")
    serve_b = worker.start_span("serve b")
    batch = [
        record("lodestar.telemetry", tracing.headers_for(serve_a), offset=1),
        record("lodestar.telemetry", tracing.headers_for(serve_b), offset=2),
        record("lodestar.telemetry", [], offset=3),  # no context: no link, still learned
    ]
    with trace.use_span(serve_a):  # a current span must not become the parent
        learn = tracing.start_linked_span(learner, tracing.OP_LEARN, batch, group="lodestar-learner")
    learn.end()

    (span,) = [s for s in mem.exporter.get_finished_spans() if s.name == "learn lodestar.telemetry"]
    assert span.parent is None
    assert span.context.trace_id not in {serve_a.get_span_context().trace_id, serve_b.get_span_context().trace_id}
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        (serve_a.get_span_context().trace_id, serve_a.get_span_context().span_id),
        (serve_b.get_span_context().trace_id, serve_b.get_span_context().span_id),
    ]
    assert span.attributes[tracing.MESSAGING_BATCH_MESSAGE_COUNT] == 3
    with pytest.raises(ValueError):
        tracing.start_linked_span(learner, tracing.OP_LEARN, [])


def test_record_error_marks_the_span_failed(mem: tracing.InMemoryTracing) -> None:
    span = mem.tracer("worker").start_span("call")
    tracing.record_error(span, "engine_unavailable", "503 after 5 attempts")
    span.end()
    (done,) = mem.exporter.get_finished_spans()
    assert done.status.status_code is StatusCode.ERROR
    assert done.attributes[tracing.ERROR_TYPE] == "engine_unavailable"


def test_exporters_from_settings_and_otel_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    assert tracing.exporter_names(TelemetrySettings()) == []
    assert tracing.exporter_names(TelemetrySettings(exporter="otlp")) == ["otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console, otlp")
    assert tracing.exporter_names(TelemetrySettings(exporter="none")) == ["console", "otlp"]
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(ValueError, match="zipkin"):
        tracing.exporter_names(TelemetrySettings())
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert tracing.exporter_names(TelemetrySettings(exporter="otlp")) == []


def test_otlp_endpoint_from_settings_or_standard_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    exporter = tracing._otlp_exporter(TelemetrySettings(otlp_endpoint="http://jaeger:4318/"))
    assert exporter._endpoint == "http://jaeger:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318")
    assert tracing._otlp_exporter(TelemetrySettings())._endpoint == "http://collector:4318/v1/traces"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ValueError, match="grpc"):
        tracing._otlp_exporter(TelemetrySettings())


def test_resource_names_service_namespace_and_instance(monkeypatch: pytest.MonkeyPatch) -> None:
    attrs = tracing.build_resource("dispatcher", TelemetrySettings(service_namespace="prod"), "d-1").attributes
    assert attrs[tracing.SERVICE_NAME] == "dispatcher"
    assert attrs[tracing.SERVICE_NAMESPACE] == "prod"
    assert attrs[tracing.SERVICE_INSTANCE_ID] == "d-1"
    assert tracing.build_resource("w", TelemetrySettings()).attributes[tracing.SERVICE_INSTANCE_ID]
    monkeypatch.setenv("OTEL_SERVICE_NAME", "renamed")
    assert tracing.build_resource("dispatcher", TelemetrySettings()).attributes[tracing.SERVICE_NAME] == "renamed"


def test_setup_tracing_installs_a_console_exporting_provider() -> None:
    """In a fresh process (the global provider can be set only once): spans print with the resource."""
    code = (
        "from lodestar import tracing\n"
        "from lodestar.settings import TelemetrySettings\n"
        "p = tracing.setup_tracing('worker', TelemetrySettings(exporter='console'), instance_id='w-1')\n"
        "assert tracing.setup_tracing('learner', TelemetrySettings()) is p\n"
        "tracing.get_tracer('worker').start_span('hello').end()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    span = json.loads(out)
    assert span["name"] == "hello"
    assert span["resource"]["attributes"][tracing.SERVICE_NAME] == "worker"
    assert span["resource"]["attributes"][tracing.SERVICE_INSTANCE_ID] == "w-1"


def test_generate_span_without_a_model_name(mem: tracing.InMemoryTracing) -> None:
    tracing.start_generate_span(mem.tracer("worker"), sampling=SamplingParams(), worker_id="w").end()
    (span,) = mem.exporter.get_finished_spans()
    assert span.name == "text_completion"
    assert tracing.GEN_AI_REQUEST_MODEL not in span.attributes
    assert span.attributes[tracing.GEN_AI_REQUEST_MAX_TOKENS] == SamplingParams().max_new_tokens
