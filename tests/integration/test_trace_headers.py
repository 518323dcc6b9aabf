"""Trace context survives a real Kafka round trip in aiokafka's headers (lodestar.tracing)."""

from __future__ import annotations

import pytest

from lodestar import tracing
from lodestar.kafka_admin import ensure_topics
from lodestar.kafka_io import make_consumer, make_producer
from lodestar.settings import Settings

pytestmark = pytest.mark.integration


async def test_consumer_span_joins_the_producer_trace_over_the_broker(
    kafka_bootstrap: str, service_settings: Settings, kafka_topic: str
) -> None:
    settings = service_settings
    await ensure_topics(settings, {kafka_topic: 1})
    mem = tracing.in_memory_tracing()
    producer = make_producer(settings, client_id="test-trace-headers")
    await producer.start()
    try:
        send = tracing.start_send_span(mem.tracer("client"), kafka_topic, request_id="r1")
        await producer.send_and_wait(kafka_topic, b"{}", key=b"r1",
                                     headers=[("x-app", b"1"), *tracing.headers_for(send)])
        send.end()
    finally:
        await producer.stop()

    consumer = make_consumer(settings, kafka_topic, group_id=None, client_id="test-trace-headers")
    await consumer.start()
    try:
        record = await consumer.getone()
    finally:
        await consumer.stop()
    tracing.start_process_span(mem.tracer("dispatcher"), tracing.OP_ROUTE, record, request_id="r1").end()
    tracing.start_linked_span(mem.tracer("learner"), tracing.OP_LEARN, [record]).end()

    spans = {s.name.split()[0]: s for s in mem.exporter.get_finished_spans()}
    assert spans["route"].context.trace_id == spans["send"].context.trace_id
    assert spans["route"].parent.span_id == spans["send"].context.span_id
    assert spans["learn"].context.trace_id != spans["send"].context.trace_id
    assert spans["learn"].links[0].context.span_id == spans["send"].context.span_id
