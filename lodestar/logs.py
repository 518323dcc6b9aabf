"""Service logging: one JSON object per line carrying the request id and the current trace, or plain text.

Every line says which service wrote it and, when known, which request (`bind_request_id`, a contextvar:
each asyncio task sees its own) and which trace and span (the current OpenTelemetry span), so a log line
leads to the request's trace in Jaeger and back.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

from lodestar.settings import TelemetrySettings

_REQUEST_ID: ContextVar[str | None] = ContextVar("lodestar_request_id", default=None)

CONTEXT_FIELDS = ("service", "request_id", "trace_id", "span_id")
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName", *CONTEXT_FIELDS,
}


@contextmanager
def bind_request_id(request_id: str) -> Iterator[None]:
    """Tag every log line written inside the block (in this task) with `request_id`."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


def current_request_id() -> str | None:
    """The request id bound in this context, if any."""
    return _REQUEST_ID.get()


class ContextFilter(logging.Filter):
    """Adds `service`, `request_id`, `trace_id` and `span_id` (None when absent) to every record."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = self.service
        record.request_id = _REQUEST_ID.get()
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            record.trace_id = trace.format_trace_id(span_context.trace_id)
            record.span_id = trace.format_span_id(span_context.span_id)
        else:
            record.trace_id = record.span_id = None
        return True


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "service", "logger", "msg", ["request_id", "trace_id", "span_id", "exc", extras]}`."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "service": getattr(record, "service", None),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in ("request_id", "trace_id", "span_id"):
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        for key, value in record.__dict__.items():  # `extra={...}` fields
            if key not in _STANDARD_ATTRS and key not in line:
                line[key] = value
        return json.dumps(line, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`<time> <LEVEL> <service> <logger>: <msg> [request_id=... trace_id=...]` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(service)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [f"{name}={value}" for name in ("request_id", "trace_id")
               if (value := getattr(record, name, None)) is not None]
        if not ids:
            return text
        head, sep, tail = text.partition("\n")  # keep ids on the message line, before a traceback
        return f"{head} [{' '.join(ids)}]{sep}{tail}"


class _LodestarHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler `setup_logging` installed, so that calling it again replaces it."""


def setup_logging(service: str, telemetry: TelemetrySettings, *, stream: TextIO | None = None) -> None:
    """Send the root logger to stderr (or `stream`) as JSON lines (`telemetry.log_json`) or plain text, at
    `telemetry.log_level`. Calling it again replaces the handler it installed; other handlers stay."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _LodestarHandler)]:
        root.removeHandler(handler)
    handler = _LodestarHandler(stream if stream is not None else sys.stderr)
    handler.addFilter(ContextFilter(service))
    handler.setFormatter(JsonFormatter() if telemetry.log_json else TextFormatter())
    root.addHandler(handler)
    root.setLevel(telemetry.log_level.upper())
