"""Structured logs: JSON lines with request_id and the current trace; per-task request ids; plain text."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace

from lodestar.logs import bind_request_id, current_request_id, setup_logging
from lodestar.settings import TelemetrySettings
from lodestar.tracing import in_memory_tracing

log = logging.getLogger("lodestar.test")


@pytest.fixture
def restore_root() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def json_out(restore_root: None) -> io.StringIO:
    out = io.StringIO()
    setup_logging("worker", TelemetrySettings(log_json=True, log_level="DEBUG"), stream=out)
    return out


def lines(out: io.StringIO) -> list[dict[str, object]]:
    """This module's log lines (asyncio writes its own at DEBUG)."""
    parsed = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in parsed if line["logger"] == log.name]


def test_json_line_carries_request_id_and_trace(json_out: io.StringIO) -> None:
    tracer = in_memory_tracing().tracer("worker")
    with tracer.start_as_current_span("serve") as span, bind_request_id("req-42"):
        log.info("served %d tokens", 64, extra={"worker_id": "h100-0"})
    (line,) = lines(json_out)
    ctx = span.get_span_context()
    assert line["msg"] == "served 64 tokens"
    assert line["level"] == "INFO"
    assert line["service"] == "worker"
    assert line["logger"] == "lodestar.test"
    assert line["request_id"] == "req-42"
    assert line["trace_id"] == trace.format_trace_id(ctx.trace_id)
    assert line["span_id"] == trace.format_span_id(ctx.span_id)
    assert line["worker_id"] == "h100-0"
    assert str(line["ts"]).endswith("Z")


def test_ids_are_absent_outside_a_request_and_span(json_out: io.StringIO) -> None:
    with bind_request_id("req-1"):
        pass
    assert current_request_id() is None
    log.warning("idle")
    (line,) = lines(json_out)
    assert "request_id" not in line and "trace_id" not in line and "span_id" not in line


def test_exceptions_stay_on_one_json_line(json_out: io.StringIO) -> None:
    try:
        raise RuntimeError("engine gone")
    except RuntimeError:
        log.exception("call failed")
    (line,) = lines(json_out)
    assert "RuntimeError: engine gone" in str(line["exc"])


async def test_each_task_logs_its_own_request_id(json_out: io.StringIO) -> None:
    async def serve(request_id: str) -> None:
        with bind_request_id(request_id):
            await asyncio.sleep(0)  # interleave the two tasks
            log.info("done")

    await asyncio.gather(serve("a"), serve("b"))
    assert sorted(str(line["request_id"]) for line in lines(json_out)) == ["a", "b"]


def test_plain_text_when_log_json_is_false(restore_root: None) -> None:
    out = io.StringIO()
    setup_logging("dispatcher", TelemetrySettings(log_json=False), stream=out)
    setup_logging("dispatcher", TelemetrySettings(log_json=False), stream=out)  # replaces, never doubles
    with bind_request_id("req-7"):
        log.info("routed")
    log.debug("below the level")
    text = out.getvalue()
    assert text.count("\n") == 1
    assert " INFO dispatcher lodestar.test: routed [request_id=req-7]" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)
