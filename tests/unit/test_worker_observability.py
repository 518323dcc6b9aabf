"""The worker's spans, metrics and logs, on the service object with a fake engine, ledger and producer (no
broker, no Redis): a record is served in a `serve` span continuing the dispatcher's trace, the engine call
is its GenAI child, result and telemetry carry the context on, and the counters move."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
from aiokafka import ConsumerRecord
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode
from worker_fakes import FakeLedger, FakeProducer, by_prompt, engine, routed_record

from lodestar import tracing
from lodestar.logs import setup_logging
from lodestar.schemas import InferenceRequest, SamplingParams
from lodestar.settings import Settings, TelemetrySettings
from workers.service import WorkerService


@pytest.fixture
def mem() -> tracing.InMemoryTracing:
    return tracing.in_memory_tracing()


@pytest.fixture
def service(mem: tracing.InMemoryTracing) -> WorkerService:
    settings = Settings(worker={"worker_id": "w1", "sglang_url": "http://engine", "gpu_type": "H100"})
    worker = WorkerService(settings, engine=engine(by_prompt))
    worker.tracer = mem.tracer("worker")
    worker.ledger = FakeLedger()  # type: ignore[assignment]
    worker._producer = FakeProducer()  # type: ignore[assignment]
    return worker


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The JSON lines `setup_logging` writes, captured; the root logger is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    stream = io.StringIO()
    setup_logging("worker", TelemetrySettings(), stream=stream)
    yield stream
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    root.setLevel(level)


def record_from(mem: tracing.InMemoryTracing, prompt: str, rid: str) -> tuple[ConsumerRecord, trace.Span]:
    """A routed message as a dispatcher publishes it, with its (ended) `route` span's context in the headers."""
    route = mem.tracer("dispatcher").start_span("route lodestar.requests")
    headers = tracing.headers_for(route)
    route.end()
    request = InferenceRequest(request_id=rid, prompt=prompt, sampling=SamplingParams(max_new_tokens=3))
    return routed_record(request, headers=headers), route


def spans_named(mem: tracing.InMemoryTracing, prefix: str) -> list[ReadableSpan]:
    return [s for s in mem.exporter.get_finished_spans() if s.name.startswith(prefix)]


def sample(service: WorkerService, name: str, **labels: str) -> float:
    value = service.metrics.registry.get_sample_value(name, {"worker": "w1", **labels})
    return 0.0 if value is None else value


async def test_a_served_record_continues_the_trace_and_moves_the_counters(
    service: WorkerService, mem: tracing.InMemoryTracing
) -> None:
    record, route = record_from(mem, "hello", "r-ok")
    await service.handle_record(record)

    (serve,) = spans_named(mem, "serve ")
    (generate,) = spans_named(mem, tracing.GEN_AI_OPERATION_TEXT_COMPLETION)
    assert serve.context.trace_id == route.get_span_context().trace_id
    assert serve.parent is not None and serve.parent.span_id == route.get_span_context().span_id
    assert generate.parent is not None and generate.parent.span_id == serve.context.span_id
    assert (serve.attributes or {})[tracing.ATTR_REQUEST_ID] == "r-ok"
    assert (serve.attributes or {})[tracing.ATTR_STATUS] == "ok"
    assert [e.name for e in generate.events] == [tracing.EVENT_FIRST_TOKEN]
    usage = generate.attributes or {}
    assert (usage[tracing.GEN_AI_USAGE_INPUT_TOKENS], usage[tracing.GEN_AI_USAGE_OUTPUT_TOKENS],
            usage[tracing.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS]) == (12, 3, 5)
    assert usage[tracing.GEN_AI_RESPONSE_FINISH_REASONS] == ("stop",)

    producer: FakeProducer = service._producer  # type: ignore[assignment]
    assert sorted(topic for topic, _, _ in producer.sent) == ["lodestar.results", "lodestar.telemetry"]
    for _, _, headers in producer.sent:  # the learner links to the `serve` span through these
        carried = trace.get_current_span(tracing.extract_context(headers)).get_span_context()
        assert carried.span_id == serve.context.span_id

    assert sample(service, "lodestar_worker_requests_total", status="ok") == 1
    assert sample(service, "lodestar_worker_requests_total", status="error") == 0
    for histogram in ("ttft", "tpot", "e2e"):
        assert sample(service, f"lodestar_worker_{histogram}_seconds_count") == 1
    assert sample(service, "lodestar_worker_inflight") == 0


async def test_engine_failures_are_counted_by_kind_and_marked_on_the_span(
    service: WorkerService, mem: tracing.InMemoryTracing, log_lines: io.StringIO
) -> None:
    for prompt in ("refused", "busy", "hello"):
        record, _ = record_from(mem, prompt, f"r-{prompt}")
        await service.handle_record(record)

    assert sample(service, "lodestar_worker_engine_errors_total", kind="rejected") == 1
    assert sample(service, "lodestar_worker_engine_errors_total", kind="unavailable") == 1
    assert sample(service, "lodestar_worker_requests_total", status="rejected") == 1
    assert sample(service, "lodestar_worker_requests_total", status="error") == 1
    assert sample(service, "lodestar_worker_requests_total", status="ok") == 1
    assert sample(service, "lodestar_worker_ttft_seconds_count") == 1  # failures have no TTFT
    assert sample(service, "lodestar_worker_inflight") == 0
    failed = [s for s in spans_named(mem, tracing.GEN_AI_OPERATION_TEXT_COMPLETION)
              if s.status.status_code is StatusCode.ERROR]
    assert sorted((s.attributes or {})[tracing.ERROR_TYPE] for s in failed) == ["rejected", "unavailable"]

    # the warning about the refused request carries its request id and the trace of its `serve` span
    serves = {(s.attributes or {})[tracing.ATTR_REQUEST_ID]: s for s in spans_named(mem, "serve ")}
    lines = [json.loads(line) for line in log_lines.getvalue().splitlines()]
    (refused,) = [line for line in lines
                  if line.get("request_id") == "r-refused" and line["logger"] == "workers.service"]
    assert refused["level"] == "WARNING" and refused["service"] == "worker"
    assert refused["trace_id"] == trace.format_trace_id(serves["r-refused"].context.trace_id)
