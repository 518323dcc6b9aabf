"""SGLang's response shapes shared by the native and the OpenAI routes: error bodies and SSE framing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

SSE_DONE = b"data: [DONE]\n\n"


class BadRequest(Exception):
    """A request SGLang's request models would reject before it reaches the engine (HTTP 400)."""


class PayloadTooLarge(Exception):
    """A request body over the server's --max-payload-size (HTTP 413)."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"Payload Too Large: the request body is larger than {limit} bytes (--max-payload-size).")


def dumps(obj: Any) -> bytes:
    """Compact JSON, as SGLang's orjson responses are."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(obj: Any) -> bytes:
    """One server-sent event carrying a JSON payload."""
    return b"data: " + dumps(obj) + b"\n\n"


def json_response(obj: Any, status_code: int = 200) -> Response:
    """A JSON response with SGLang's compact encoding."""
    return Response(dumps(obj), status_code=status_code, media_type="application/json")


def error_body(message: str, err_type: str, code: int) -> dict[str, Any]:
    """SGLang's ErrorResponse: `{object: "error", message, type, param, code}`."""
    return {"object": "error", "message": message, "type": err_type, "param": None, "code": code}


def error_response(message: str, err_type: str, code: int) -> Response:
    """An ErrorResponse body with its status code."""
    return json_response(error_body(message, err_type, code), status_code=code)


def native_error(message: str) -> Response:
    """The native API's 400 for a request the tokenizer manager rejected: `{"error": {"message"}}`."""
    return JSONResponse({"error": {"message": message}}, status_code=400)


def event_stream(chunks: AsyncIterator[bytes]) -> StreamingResponse:
    """An SSE response."""
    return StreamingResponse(chunks, media_type="text/event-stream")


async def events(*chunks: bytes) -> AsyncIterator[bytes]:
    """A fixed sequence of SSE chunks, as a stream."""
    for chunk in chunks:
        yield chunk


async def read_json_object(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or BadRequest with a validation-style message; PayloadTooLarge
    past the app's `max_payload_size` (read as it arrives: a body without Content-Length is bounded too)."""
    limit: int | None = getattr(request.app.state, "max_payload_size", None)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if limit is not None and size > limit:
            raise PayloadTooLarge(limit)
        chunks.append(chunk)
    body = b"".join(chunks)
    try:
        obj = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"JSON decode error: {exc}") from None
    if not isinstance(obj, dict):
        raise BadRequest("Input should be a valid dictionary or object to extract fields from")
    return obj


async def wait_unless_disconnected(request: Request, done: Callable[[], Awaitable[None]]) -> bool:
    """Await `done()` unless the client disconnects first; True if it completed."""
    finished = asyncio.ensure_future(done())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({finished, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not finished.done():
            finished.cancel()
    return finished.done() and not finished.cancelled()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
