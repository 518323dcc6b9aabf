"""One request, one trace, over the real pipeline: the real broker and Redis, an emulator process, and the
client, dispatcher, worker and learner running in this process so that one in-memory exporter sees every
span. The client's `send`, the dispatcher's `route`, the worker's `serve` and its engine call form one
parent/child chain in one trace; the learner's `learn` span is a trace of its own that links to it. The
dead-worker takeover's re-route continues the original trace from the routed message's headers."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from dispatcher_harness import FakeWorkers, dispatch_settings, running_dispatcher, running_learner, wait_until
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind
from worker_harness import cleanup, create_topics, running_worker

from lodestar import tracing
from lodestar.client import LodestarClient
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.kafka_io import make_consumer, make_producer
from lodestar.names import Topics
from lodestar.schemas import InferenceRequest, RoutedRequest, RoutingDecision, SamplingParams

pytestmark = pytest.mark.integration


@pytest.fixture
def mem() -> Iterator[tracing.InMemoryTracing]:
    """Every service in this process records here (the global provider); stops recording afterwards."""
    recorder = tracing.in_memory_tracing(install_global=True)
    yield recorder
    recorder.exporter.shutdown()


def spans_of(mem: tracing.InMemoryTracing, request_id: str) -> dict[str, ReadableSpan]:
    """The request's spans by operation (`send`, `route`, `serve`), each exactly once."""
    found: dict[str, ReadableSpan] = {}
    for span in mem.exporter.get_finished_spans():
        if (span.attributes or {}).get(tracing.ATTR_REQUEST_ID) == request_id:
            operation = span.name.split()[0]
            assert operation not in found, f"two {operation} spans for {request_id}"
            found[operation] = span
    return found


def learn_spans(mem: tracing.InMemoryTracing) -> list[ReadableSpan]:
    return [s for s in mem.exporter.get_finished_spans() if s.name.startswith(f"{tracing.OP_LEARN} ")]


async def test_one_request_is_one_trace_and_the_learner_links_to_it(
    engine_url: str, tmp_path: Path, mem: tracing.InMemoryTracing
) -> None:
    settings = dispatch_settings()
    settings.worker = settings.worker.model_copy(update={"sglang_url": engine_url})
    settings.learner = settings.learner.model_copy(update={"model": "river",
                                                           "checkpoint_path": tmp_path / "learner.json"})
    await create_topics(settings)
    try:
        async with (
            running_worker(settings),
            running_dispatcher(settings),
            running_learner(settings) as learner,
            LodestarClient(settings) as client,
        ):
            result = await client.generate(prompt="Where does this request go, and why?",
                                           sampling=SamplingParams(max_new_tokens=8), timeout_s=60)
            rid = result.request_id
            await wait_until(lambda: learner.stats.events >= 1 and bool(learn_spans(mem)), 30, "the learner")
    finally:
        await cleanup(settings)

    assert result.status == "ok" and result.worker_id == "w1"
    spans = spans_of(mem, rid)
    assert set(spans) == {"send", "route", "serve"}
    send, route, serve = spans["send"], spans["route"], spans["serve"]
    (generate,) = [s for s in mem.exporter.get_finished_spans()
                   if s.parent is not None and s.parent.span_id == serve.context.span_id]

    # one trace, one chain: client -> dispatcher -> worker -> engine call
    trace_id = send.context.trace_id
    assert {s.context.trace_id for s in (send, route, serve, generate)} == {trace_id}
    assert send.parent is None and send.kind is SpanKind.PRODUCER
    assert route.parent is not None and route.parent.span_id == send.context.span_id
    assert serve.parent is not None and serve.parent.span_id == route.context.span_id
    assert [s.instrumentation_scope.name for s in (send, route, serve, generate)] == [
        "lodestar.client", "lodestar.dispatcher", "lodestar.worker", "lodestar.worker"]

    # why the request went where it did
    decision = route.attributes or {}
    assert decision[tracing.ATTR_POLICY] == "least_request" and decision[tracing.ATTR_WORKER_ID] == "w1"
    assert decision[tracing.ATTR_MODEL_VERSION] == 0 and decision[tracing.ATTR_EXPLORED] is False
    assert tracing.ATTR_MATCHED_PREFIX_TOKENS in decision
    assert (serve.attributes or {})[tracing.ATTR_STATUS] == "ok"

    # the engine call: first-token event and GenAI usage matching the result
    assert generate.kind is SpanKind.CLIENT
    assert [e.name for e in generate.events] == [tracing.EVENT_FIRST_TOKEN]
    usage = generate.attributes or {}
    assert usage[tracing.GEN_AI_USAGE_OUTPUT_TOKENS] == result.completion_tokens == 8
    assert usage[tracing.GEN_AI_USAGE_INPUT_TOKENS] == result.prompt_tokens > 0
    assert usage[tracing.GEN_AI_REQUEST_MAX_TOKENS] == 8

    # the learner: its own trace, linked to the worker's span that published the telemetry
    links = [(span, link) for span in learn_spans(mem) for link in span.links if link.context.trace_id == trace_id]
    assert len(links) == 1
    learn, link = links[0]
    assert learn.context.trace_id != trace_id and learn.parent is None
    assert link.context.span_id == serve.context.span_id


async def test_a_rerouted_request_continues_its_trace(
    kafka_bootstrap: str, redis_url: str, mem: tracing.InMemoryTracing
) -> None:
    """A dead worker's backlog is re-routed under the context its routed messages carry."""
    settings = dispatch_settings(dead_worker_timeout_s=1.0)
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    original = tracing.start_send_span(mem.tracer("test"), topics.worker("gone"), request_id="r-lost")
    routed = RoutedRequest(request=InferenceRequest(request_id="r-lost", prompt="still wanted"),
                           decision=RoutingDecision(worker_id="gone", policy="x"))
    producer = make_producer(settings, client_id="test-tracing")
    try:
        async with FakeWorkers(settings) as workers, running_dispatcher(settings) as service:
            await workers.add("gone")
            await workers.add("alive")
            await wait_until(lambda: "gone" in {w.worker_id for w in service.view.live}, 5, "registry view")
            await asyncio.sleep(service.takeover.check_every_s * 2)  # the takeover has recorded its heartbeat
            await producer.start()
            await producer.send_and_wait(topics.worker("gone"), routed.to_bytes(), key=b"r-lost",
                                         headers=tracing.headers_for(original))
            original.end()
            await workers.kill("gone")
            await wait_until(lambda: service.takeover.rerouted == 1, 30, "the takeover")
            consumer = make_consumer(settings, topics.worker("alive"), group_id=None, client_id="test-tracing")
            await consumer.start()
            try:
                forwarded = await asyncio.wait_for(consumer.getone(), 20)
            finally:
                await consumer.stop()
    finally:
        await producer.stop()
        await cleanup(settings)

    reroute = spans_of(mem, "r-lost")["route"]
    assert reroute.name == f"{tracing.OP_ROUTE} {topics.worker('gone')}"
    assert reroute.context.trace_id == original.context.trace_id
    assert reroute.parent is not None and reroute.parent.span_id == original.context.span_id
    attributes = reroute.attributes or {}
    assert attributes[tracing.ATTR_WORKER_ID] == "alive" and attributes[tracing.ATTR_ATTEMPT] == 1
    carried = tracing.extract_context(forwarded.headers)
    assert trace.get_current_span(carried).get_span_context().span_id == reroute.context.span_id
