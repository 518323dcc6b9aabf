"""OpenTelemetry tracing for every service: provider setup, W3C context in Kafka headers, span helpers.

One trace per request: the client's `send` span (PRODUCER) is the root; the dispatcher's `route` span
and the worker's `serve` span (CONSUMER) are parented by the context carried in the Kafka headers of the
message they consumed; the worker's GenAI span is a child of `serve`. The learner's `learn` span starts a
trace of its own, LINKED to each telemetry message's trace (a batch of telemetry has many parents).

Propagation is hand-rolled on the official propagate API (`traceparent`/`tracestate`/`baggage`, or
whatever `OTEL_PROPAGATORS` selects) over aiokafka's list-of-tuples headers; no auto-instrumentation.
Helpers return plain `Span`s that the caller ends (`with trace.use_span(span, end_on_exit=True):` makes
one current), so batch code (the dispatcher) and per-request code (the worker) use the same calls.
Attribute names live here, once: the `lodestar.*` ones, messaging and GenAI semantic conventions.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from aiokafka import ConsumerRecord
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer

from lodestar.schemas import RoutingDecision, SamplingParams
from lodestar.settings import TelemetrySettings

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

# -- attribute and event names ---------------------------------------------------------------------------

# Resource (semantic conventions, stable).
SERVICE_NAME = "service.name"
SERVICE_NAMESPACE = "service.namespace"
SERVICE_INSTANCE_ID = "service.instance.id"

# Lodestar's own span attributes.
ATTR_REQUEST_ID = "lodestar.request_id"
ATTR_POLICY = "lodestar.policy"
ATTR_WORKER_ID = "lodestar.worker_id"
ATTR_DISPATCHER_ID = "lodestar.dispatcher_id"
ATTR_PREDICTED_TTFT_MS = "lodestar.predicted_ttft_ms"
ATTR_MODEL_VERSION = "lodestar.model_version"
ATTR_MATCHED_PREFIX_TOKENS = "lodestar.matched_prefix_tokens"
ATTR_EXPLORED = "lodestar.explored"
ATTR_ATTEMPT = "lodestar.attempt"
ATTR_STATUS = "lodestar.status"

# Messaging semantic conventions (Kafka).
MESSAGING_SYSTEM = "messaging.system"
MESSAGING_DESTINATION_NAME = "messaging.destination.name"
MESSAGING_OPERATION_TYPE = "messaging.operation.type"
MESSAGING_OPERATION_NAME = "messaging.operation.name"
MESSAGING_MESSAGE_ID = "messaging.message.id"
MESSAGING_BATCH_MESSAGE_COUNT = "messaging.batch.message_count"
MESSAGING_CONSUMER_GROUP_NAME = "messaging.consumer.group.name"
MESSAGING_DESTINATION_PARTITION_ID = "messaging.destination.partition.id"
MESSAGING_KAFKA_MESSAGE_KEY = "messaging.kafka.message.key"
MESSAGING_KAFKA_OFFSET = "messaging.kafka.offset"
KAFKA = "kafka"

# GenAI semantic conventions. `gen_ai.provider.name` replaced `gen_ai.system`; both are set because
# many trace backends still key on the older name.
GEN_AI_SYSTEM = "gen_ai.system"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_REQUEST_TEMPERATURE = "gen_ai.request.temperature"
GEN_AI_REQUEST_TOP_P = "gen_ai.request.top_p"
GEN_AI_REQUEST_STREAM = "gen_ai.request.stream"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK = "gen_ai.response.time_to_first_chunk"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
GEN_AI_PROVIDER_SGLANG = "sglang"
GEN_AI_OPERATION_TEXT_COMPLETION = "text_completion"

ERROR_TYPE = "error.type"

# Event on the GenAI span when the first non-empty chunk arrives.
EVENT_FIRST_TOKEN = "lodestar.first_token"

# Operations: span names are "<operation> <topic>", e.g. "route lodestar.requests".
OP_SEND = "send"
OP_ROUTE = "route"
OP_SERVE = "serve"
OP_LEARN = "learn"

# -- provider setup ---------------------------------------------------------------------------------

EXPORTERS = ("none", "console", "otlp")
OTLP_PROTOCOL = "http/protobuf"
OTLP_TRACES_PATH = "/v1/traces"


def tracer_name(service_name: str) -> str:
    """The instrumentation scope of a service's spans (`lodestar.<service>`)."""
    return f"lodestar.{service_name}"


def get_tracer(service_name: str) -> Tracer:
    """The tracer a service uses, from the global provider (installed by `setup_tracing`)."""
    return trace.get_tracer(tracer_name(service_name))


def exporter_names(telemetry: TelemetrySettings) -> list[str]:
    """Exporters to use: `OTEL_TRACES_EXPORTER` (comma-separated) if set, else `telemetry.exporter`.

    `OTEL_SDK_DISABLED=true` means none. Raises ValueError for an exporter this build does not have.
    """
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    raw = os.environ.get("OTEL_TRACES_EXPORTER") or telemetry.exporter
    names = [n.strip().lower() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in EXPORTERS]
    if unknown:
        raise ValueError(f"unknown trace exporter(s) {unknown}: choose from {', '.join(EXPORTERS)}")
    return [n for n in names if n != "none"]


def _otlp_exporter(telemetry: TelemetrySettings) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    protocol = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
    if protocol and protocol != OTLP_PROTOCOL:
        raise ValueError(f"OTLP protocol {protocol!r} is not installed; only {OTLP_PROTOCOL} is")
    if os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return OTLPSpanExporter()  # the SDK resolves the standard variables (and appends /v1/traces)
    return OTLPSpanExporter(endpoint=telemetry.otlp_endpoint.rstrip("/") + OTLP_TRACES_PATH)


def build_resource(service_name: str, telemetry: TelemetrySettings, instance_id: str | None = None) -> Resource:
    """service.name (unless `OTEL_SERVICE_NAME` overrides it), service.namespace, service.instance.id,
    merged over `OTEL_RESOURCE_ATTRIBUTES`."""
    attributes: dict[str, str] = {
        SERVICE_NAMESPACE: telemetry.service_namespace,
        SERVICE_INSTANCE_ID: instance_id or uuid.uuid4().hex,
    }
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name
    return Resource.create(attributes)


def setup_tracing(
    service_name: str, telemetry: TelemetrySettings, *, instance_id: str | None = None
) -> TracerProvider:
    """Install the global TracerProvider of this process, with exporters from settings and `OTEL_*`.

    `none` still creates real spans (trace ids for logs and for propagation to the next service), it
    only exports nothing. `console` prints each span as it ends; `otlp` batches to OTLP/HTTP (protobuf)
    at `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` or `telemetry.otlp_endpoint`. The sampler follows
    `OTEL_TRACES_SAMPLER`. If an SDK provider is already installed (several services in one process, or
    a test's in-memory provider), that one is returned untouched.
    """
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        log.info("tracing already set up in this process; %s uses the existing provider", service_name)
        return current
    provider = TracerProvider(resource=build_resource(service_name, telemetry, instance_id))
    for name in exporter_names(telemetry):
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        else:
            provider.add_span_processor(BatchSpanProcessor(_otlp_exporter(telemetry)))
    trace.set_tracer_provider(provider)
    return provider


@dataclass(frozen=True)
class InMemoryTracing:
    """A provider whose finished spans are kept in memory, for tests."""

    provider: TracerProvider
    exporter: InMemorySpanExporter

    def tracer(self, service_name: str) -> Tracer:
        """A tracer of this provider (not the global one)."""
        return self.provider.get_tracer(tracer_name(service_name))


def in_memory_tracing(service_name: str = "test", *, install_global: bool = False) -> InMemoryTracing:
    """Spans recorded synchronously into an InMemorySpanExporter (`exporter.get_finished_spans()`).

    With `install_global`, services calling `get_tracer`/`setup_tracing` in this process record there
    too; the global provider can be set only once per process, so later calls add their exporter to the
    SDK provider already installed (call `exporter.clear()` between tests, or use a fresh one).
    """
    exporter = InMemorySpanExporter()
    current = trace.get_tracer_provider()
    if install_global and isinstance(current, TracerProvider):
        provider = current
    else:
        provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        if install_global:
            trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return InMemoryTracing(provider, exporter)


# -- W3C trace context in Kafka headers --------------------------------------------------------------


class _HeadersGetter(Getter[Sequence[tuple[str, bytes]]]):
    """Reads propagation fields from aiokafka headers (header names compared case-insensitively)."""

    def get(self, carrier: Sequence[tuple[str, bytes]], key: str) -> list[str] | None:
        key = key.lower()
        values = [v.decode("utf-8", "replace") for k, v in carrier if k.lower() == key and v is not None]
        return values or None

    def keys(self, carrier: Sequence[tuple[str, bytes]]) -> list[str]:
        return [k for k, _ in carrier]


class _HeadersSetter(Setter[Headers]):
    """Appends a propagation field to aiokafka headers (`inject_headers` always starts from an empty list)."""

    def set(self, carrier: Headers, key: str, value: str) -> None:
        carrier.append((key, value.encode("utf-8")))


_GETTER = _HeadersGetter()
_SETTER = _HeadersSetter()


def inject_headers(context: Context | None = None) -> Headers:
    """Kafka headers carrying `context` (default: the current one) with the global propagator."""
    headers: Headers = []
    propagate.inject(headers, context=context, setter=_SETTER)
    return headers


def extract_context(headers: Sequence[tuple[str, bytes]] | None) -> Context:
    """The context carried in Kafka headers (an empty context when they carry none)."""
    return propagate.extract(headers or (), getter=_GETTER)


def headers_for(span: Span) -> Headers:
    """Kafka headers that make `span` the parent of whatever consumes the message."""
    return inject_headers(trace.set_span_in_context(span))


# -- spans ------------------------------------------------------------------------------------------


def start_send_span(tracer: Tracer, topic: str, *, request_id: str | None = None, key: str | None = None) -> Span:
    """A PRODUCER span for publishing one message (the client's submit: the root of a request's trace).

    Publish with `headers=headers_for(span)` and end the span once the broker acknowledged.
    """
    attributes: dict[str, str] = {
        MESSAGING_SYSTEM: KAFKA,
        MESSAGING_DESTINATION_NAME: topic,
        MESSAGING_OPERATION_TYPE: "send",
        MESSAGING_OPERATION_NAME: OP_SEND,
    }
    if request_id is not None:
        attributes[ATTR_REQUEST_ID] = request_id
        attributes[MESSAGING_MESSAGE_ID] = request_id
    if key is not None:
        attributes[MESSAGING_KAFKA_MESSAGE_KEY] = key
    return tracer.start_span(f"{OP_SEND} {topic}", kind=SpanKind.PRODUCER, attributes=attributes)


def _record_attributes(record: ConsumerRecord, group: str | None) -> dict[str, str | int]:
    attributes: dict[str, str | int] = {
        MESSAGING_SYSTEM: KAFKA,
        MESSAGING_DESTINATION_NAME: record.topic,
        MESSAGING_OPERATION_TYPE: "process",
        MESSAGING_DESTINATION_PARTITION_ID: str(record.partition),
        MESSAGING_KAFKA_OFFSET: record.offset,
    }
    if group:
        attributes[MESSAGING_CONSUMER_GROUP_NAME] = group
    if isinstance(record.key, bytes | bytearray):
        attributes[MESSAGING_KAFKA_MESSAGE_KEY] = bytes(record.key).decode("utf-8", "replace")
    return attributes


def start_process_span(
    tracer: Tracer,
    operation: str,
    record: ConsumerRecord,
    *,
    request_id: str | None = None,
    group: str | None = None,
    start_time_ns: int | None = None,
) -> Span:
    """A CONSUMER span for processing one consumed record, child of the context in its headers.

    `operation` is OP_ROUTE (dispatcher) or OP_SERVE (worker). `start_time_ns` (time.time_ns()) lets a
    batch consumer start every span at the moment the batch was consumed.
    """
    attributes = _record_attributes(record, group)
    attributes[MESSAGING_OPERATION_NAME] = operation
    if request_id is not None:
        attributes[ATTR_REQUEST_ID] = request_id
    return tracer.start_span(
        f"{operation} {record.topic}",
        context=extract_context(record.headers),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        start_time=start_time_ns,
    )


def links_from_headers(headers_list: Iterable[Sequence[tuple[str, bytes]] | None]) -> list[Link]:
    """One link per message whose headers carry a valid span context."""
    links: list[Link] = []
    for headers in headers_list:
        span_context = trace.get_current_span(extract_context(headers)).get_span_context()
        if span_context.is_valid:
            links.append(Link(span_context))
    return links


def start_linked_span(
    tracer: Tracer, operation: str, records: Sequence[ConsumerRecord], *, group: str | None = None
) -> Span:
    """A new root span LINKED (not parented) to the trace of each record: the learner's `learn` span.

    A learner batch mixes many requests, so it cannot be the child of any one of them; each request's
    trace still points at the learning through the link. Raises ValueError for an empty batch.
    """
    if not records:
        raise ValueError("a linked span needs at least one record")
    topic = records[0].topic
    attributes: dict[str, str | int] = {
        MESSAGING_SYSTEM: KAFKA,
        MESSAGING_DESTINATION_NAME: topic,
        MESSAGING_OPERATION_TYPE: "process",
        MESSAGING_OPERATION_NAME: operation,
        MESSAGING_BATCH_MESSAGE_COUNT: len(records),
    }
    if group:
        attributes[MESSAGING_CONSUMER_GROUP_NAME] = group
    return tracer.start_span(
        f"{operation} {topic}",
        context=Context(),  # a new trace, whatever is current
        kind=SpanKind.CONSUMER,
        attributes=attributes,
        links=links_from_headers(r.headers for r in records),
    )


def set_decision_attributes(span: Span, decision: RoutingDecision) -> None:
    """Why the dispatcher sent a request where it did, on its `route` span."""
    attributes: dict[str, str | int | float | bool] = {
        ATTR_POLICY: decision.policy,
        ATTR_WORKER_ID: decision.worker_id,
        ATTR_MODEL_VERSION: decision.model_version,
        ATTR_MATCHED_PREFIX_TOKENS: decision.matched_prefix_tokens,
        ATTR_EXPLORED: decision.explored,
        ATTR_ATTEMPT: decision.attempt,
    }
    if decision.dispatcher_id:
        attributes[ATTR_DISPATCHER_ID] = decision.dispatcher_id
    if decision.predicted_ttft_ms is not None:
        attributes[ATTR_PREDICTED_TTFT_MS] = decision.predicted_ttft_ms
    span.set_attributes(attributes)


def start_generate_span(
    tracer: Tracer,
    *,
    sampling: SamplingParams,
    worker_id: str,
    model: str = "",
    context: Context | None = None,
) -> Span:
    """A CLIENT span for the streaming call to the SGLang engine, with GenAI request attributes.

    `model` is the served model's name when the worker knows it. Its parent is `context` or the current
    span (the worker's `serve` span). Record the first token with `record_first_token`, the usage with
    `record_usage`, failures with `record_error`.
    """
    operation = GEN_AI_OPERATION_TEXT_COMPLETION
    attributes: dict[str, str | int | float | bool] = {
        GEN_AI_SYSTEM: GEN_AI_PROVIDER_SGLANG,
        GEN_AI_PROVIDER_NAME: GEN_AI_PROVIDER_SGLANG,
        GEN_AI_OPERATION_NAME: operation,
        GEN_AI_REQUEST_MAX_TOKENS: sampling.max_new_tokens,
        GEN_AI_REQUEST_TEMPERATURE: sampling.temperature,
        GEN_AI_REQUEST_TOP_P: sampling.top_p,
        GEN_AI_REQUEST_STREAM: True,
        ATTR_WORKER_ID: worker_id,
    }
    if model:
        attributes[GEN_AI_REQUEST_MODEL] = model
    return tracer.start_span(
        f"{operation} {model}" if model else operation, context=context, kind=SpanKind.CLIENT, attributes=attributes
    )


def record_first_token(span: Span, ttft_s: float) -> None:
    """The first non-empty chunk arrived `ttft_s` seconds after the request was sent: an event now."""
    span.add_event(EVENT_FIRST_TOKEN, {GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK: ttft_s})
    span.set_attribute(GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK, ttft_s)


def record_usage(
    span: Span,
    *,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int = 0,
    finish_reason: str | None = None,
) -> None:
    """Token usage of a finished generation (GenAI attributes; cached = prompt tokens read from cache)."""
    attributes: dict[str, int | list[str]] = {
        GEN_AI_USAGE_INPUT_TOKENS: input_tokens,
        GEN_AI_USAGE_OUTPUT_TOKENS: output_tokens,
        GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS: cached_tokens,
    }
    if finish_reason:
        attributes[GEN_AI_RESPONSE_FINISH_REASONS] = [finish_reason]
    span.set_attributes(attributes)


def record_error(span: Span, kind: str, message: str) -> None:
    """Mark a span failed: `error.type` is a short fixed kind (e.g. `engine_unavailable`), then the text."""
    span.set_attribute(ERROR_TYPE, kind)
    span.set_status(Status(StatusCode.ERROR, message))
