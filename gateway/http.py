"""The gateway's HTTP API (starlette): OpenAI's `/v1/chat/completions`, `/v1/completions`, `/v1/models`, SGLang's
native `/generate`, and `/health`, `/healthz`, `/readyz`, `/metrics` (open: no API key).

A generation request is admitted (API key, rate limit, body size, body validation, model name, saturation:
gateway/service.py), planned (gateway/request_models.py), and answered by `PipelineResponse`, which runs the
exchange with the pipeline while it watches the connection: a client that disconnects aborts its requests.
A streamed answer's status and headers wait for its first event, so a request the engine refuses before any
output (too long for the context, say) still gets its proper HTTP error rather than a 200 with an error
inside; after the first event an error is one last SSE event `{"error": {...}}` before `[DONE]`. An answer's
headers carry its id (`x-request-id`, whose part after the prefix is the pipeline's request id, in logs,
traces and telemetry) and the worker serving it (`x-lodestar-worker`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway import render
from gateway.errors import ApiError, from_result, invalid
from gateway.request_models import (
    ChatRequest,
    CompletionRequest,
    GenerateRequest,
    Plan,
    new_base,
    plan_chat,
    plan_completion,
    plan_generate,
)
from gateway.service import GatewayService
from lodestar.client import Reply
from lodestar.schemas import now_ms
from lodestar.streams import StreamInterrupted

SESSION_HEADER = "x-session-id"
REQUEST_ID_HEADER = b"x-request-id"  # the answer's id (`chatcmpl-<id>`...): its trace, logs and telemetry
WORKER_HEADER = b"x-lodestar-worker"  # the worker(s) serving it, as far as known when the answer starts
JSON = "application/json"


def json_response(obj: Any, status: int = 200) -> Response:
    return Response(render.dumps(obj), status_code=status, media_type=JSON)


def error_response(err: ApiError) -> Response:
    return Response(err.to_bytes(), status_code=err.status, media_type=JSON, headers=err.headers())


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, at most `limit` bytes (413 past it, with or without a Content-Length)."""
    too_large = ApiError(413, f"Payload Too Large: the request body is larger than {limit} bytes",
                         code="payload_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse(model: type[BaseModel], raw: bytes, what: str) -> Any:
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        raise invalid(exc, what) from None


async def merged(replies: list[Reply]) -> AsyncIterator[tuple[int, list[str]]]:
    """The pieces of several replies as they come, in batches (what has arrived), each with its reply's index."""
    if len(replies) == 1:
        async for batch in replies[0].batches():
            yield 0, batch
        return
    queue: asyncio.Queue[tuple[int, list[str]] | BaseException | None] = asyncio.Queue()

    async def pump(k: int, reply: Reply) -> None:
        try:
            async for batch in reply.batches():
                queue.put_nowait((k, batch))
        except BaseException as exc:
            queue.put_nowait(exc)
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(k, r)) for k, r in enumerate(replies)]
    try:
        open_ = len(tasks)
        while open_:
            item = await queue.get()
            if item is None:
                open_ -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()


def check_results(replies: list[Reply]) -> None:
    for reply in replies:
        if reply.result.status != "ok":
            raise from_result(reply.result)


class PipelineResponse:
    """Answers one planned request from the pipeline (see the module doc)."""

    def __init__(self, service: GatewayService, plan: Plan, route: str, received: float):
        self.service = service
        self.plan = plan
        self.route = route
        self.received = received
        self.deadline = asyncio.get_running_loop().time() + service.settings.gateway.request_timeout_s
        self.status = 0
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.create_task(self._pump(send))
        gone = asyncio.create_task(_disconnected(receive))
        try:
            await asyncio.wait({pump, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not pump.done():  # the client went away: the exchange aborts what is unanswered
                pump.cancel()
                await asyncio.gather(pump, return_exceptions=True)
                self.service.metrics.record_aborted("client_disconnect")
                self.status = 499
            self.service.metrics.record_request(self.route, self.status)
        pump.result()

    async def _start(self, send: Send, status: int, media_type: str, headers: dict[str, str] | None = None,
                     replies: list[Reply] | None = None) -> None:
        self.status = status
        self._started = True
        raw = [(b"content-type", media_type.encode()), (REQUEST_ID_HEADER, self.plan.response_id.encode())]
        workers = ",".join(dict.fromkeys(r.worker_id for r in replies or () if r.worker_id))
        if workers:
            raw.append((WORKER_HEADER, workers.encode()))
        raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        if media_type == "text/event-stream":
            raw += [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        if status == 200:
            self.service.metrics.ttft.observe(time.perf_counter() - self.received)

    async def _pump(self, send: Send) -> None:
        error: ApiError | None = None
        try:
            async with asyncio.timeout_at(self.deadline), self.service.exchange(self.plan) as replies:
                if self.plan.stream:
                    await self._stream(send, replies)
                else:
                    await self._whole(send, replies)
        except TimeoutError:
            self.service.metrics.record_aborted("deadline")
            limit = self.service.settings.gateway.request_timeout_s
            error = ApiError(504, f"the request did not finish within {limit:g} s (gateway.request_timeout_s)",
                             code="timeout")
        except ApiError as exc:
            error = exc
        except StreamInterrupted as exc:
            self.service.metrics.record_aborted("interrupted")
            error = ApiError(502, str(exc), code="stream_interrupted")
        except (ValueError, KeyError, TypeError) as exc:  # an answer that does not parse
            error = ApiError(502, f"unreadable answer from the pipeline: {exc}", code="bad_answer")
        if error is None:
            return
        if not self._started:
            await self._start(send, error.status, JSON, error.headers())
            await send({"type": "http.response.body", "body": error.to_bytes()})
            return
        await send({"type": "http.response.body", "body": render.sse(error.to_bytes()) + render.SSE_DONE})

    async def _stream(self, send: Send, replies: list[Reply]) -> None:
        renderer = render.StreamRenderer(self.plan)
        async for k, batch in merged(replies):
            events = [e for e in (renderer.event(k, piece) for piece in batch) if e is not None]
            if not events:
                continue
            if not self._started:
                await self._start(send, 200, "text/event-stream", replies=replies)
            await send({"type": "http.response.body", "body": b"".join(events), "more_body": True})
        check_results(replies)
        if not self._started:
            await self._start(send, 200, "text/event-stream", replies=replies)
        await send({"type": "http.response.body", "body": b"".join(renderer.closing())})

    async def _whole(self, send: Send, replies: list[Reply]) -> None:
        pieces = []
        for reply in replies:
            got, result = await reply.collect()
            if result.status != "ok":
                raise from_result(result)
            if not got:
                raise ApiError(502, "the pipeline answered without a response body", code="bad_answer")
            pieces.append(got[-1])
        body = render.body(self.plan, pieces)
        await self._start(send, 200, JSON, replies=replies)
        await send({"type": "http.response.body", "body": body})


async def _disconnected(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


Planner = Callable[[Any, dict[str, Any]], Plan]


class Api:
    """The route handlers of one gateway."""

    def __init__(self, service: GatewayService):
        self.service = service
        self.settings = service.settings.gateway

    async def _admitted(self, request: Request) -> str:
        """The request's key id once its key and its rate limit allow it."""
        key_id = self.service.keys.identify(request.headers)
        try:
            await self.service.limiter.take(key_id)
        except ApiError:
            self.service.metrics.record_refused("rate_limited")
            raise
        except (RedisError, OSError) as exc:
            raise ApiError(503, f"the rate limiter is unavailable: {exc!r}", code="unavailable",
                           retry_after_s=1) from None
        return key_id

    async def _generation(self, request: Request, route: str, model: type[BaseModel], what: str,
                          planner: Planner) -> Response | PipelineResponse:
        received = time.perf_counter()
        try:
            key_id = await self._admitted(request)
            body = parse(model, await read_body(request, self.settings.max_body_bytes), what)
            name = getattr(body, "model", None)
            if name is not None and name != self.settings.model_name:
                raise ApiError(404, f"The model '{name}' does not exist", param="model", code="model_not_found")
            session = request.headers.get(SESSION_HEADER)
            if session is not None and not 0 < len(session) <= 256:
                raise ApiError(400, f"{SESSION_HEADER} must be 1 to 256 characters", code="invalid_value")
            deadline_ms = now_ms() + self.settings.request_timeout_s * 1000.0
            base = new_base(self.service.reply_topic, deadline_ms, session,
                            {"gateway": self.service.gateway_id, "api_key": key_id})
            try:
                plan = planner(body, base)
            except ValidationError as exc:
                raise invalid(exc, what) from None
            self.service.admit(len(plan.requests))
        except ApiError as err:
            self.service.metrics.record_request(route, err.status)
            return error_response(err)
        return PipelineResponse(self.service, plan, route, received)

    async def chat(self, request: Request) -> Response | PipelineResponse:
        return await self._generation(request, "/v1/chat/completions", ChatRequest, "chat completion request",
                                      plan_chat)

    async def completions(self, request: Request) -> Response | PipelineResponse:
        return await self._generation(request, "/v1/completions", CompletionRequest, "completion request",
                                      plan_completion)

    async def generate(self, request: Request) -> Response | PipelineResponse:
        return await self._generation(request, "/generate", GenerateRequest, "generate request", plan_generate)

    def _card(self) -> dict[str, Any]:
        name = self.settings.model_name
        return {"id": name, "object": "model", "created": self.service.started_at, "owned_by": "lodestar",
                "root": name, "parent": None, "max_model_len": self.settings.context_length}

    async def models(self, request: Request) -> Response:
        try:
            self.service.keys.identify(request.headers)
        except ApiError as err:
            return error_response(err)
        return json_response({"object": "list", "data": [self._card()]})

    async def model(self, request: Request) -> Response:
        try:
            self.service.keys.identify(request.headers)
            if request.path_params["model"] != self.settings.model_name:
                raise ApiError(404, f"The model '{request.path_params['model']}' does not exist", param="model",
                               code="model_not_found")
        except ApiError as err:
            return error_response(err)
        return json_response(self._card())

    async def health(self, _: Request) -> Response:
        """SGLang's /health: 200 while ready."""
        return Response(status_code=200 if self.service.health.ready else 503)

    async def healthz(self, _: Request) -> Response:
        """Liveness: this handler ran, so the event loop does."""
        return json_response({"alive": True})

    async def readyz(self, _: Request) -> Response:
        conditions = self.service.health.conditions()
        ready = all(c.ready for c in conditions.values())
        return json_response({"ready": ready, "conditions": {
            name: {"ready": c.ready, "detail": c.detail} for name, c in conditions.items()}}, 200 if ready else 503)

    async def metrics(self, _: Request) -> Response:
        self.service.metrics.orphan_replies.set(self.service.client.orphan_replies)
        return Response(generate_latest(self.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(ApiError(exc.status_code, str(exc.detail), code=code))


def create_app(service: GatewayService) -> Starlette:
    """The gateway's ASGI app."""
    api = Api(service)
    handlers: list[tuple[str, Callable[[Request], Awaitable[Any]], str]] = [
        ("/v1/chat/completions", api.chat, "POST"), ("/v1/completions", api.completions, "POST"),
        ("/generate", api.generate, "POST"), ("/v1/models", api.models, "GET"),
        ("/v1/models/{model:path}", api.model, "GET"), ("/health", api.health, "GET"),
        ("/healthz", api.healthz, "GET"), ("/readyz", api.readyz, "GET"), ("/metrics", api.metrics, "GET"),
    ]
    # a handler returns a starlette Response or a PipelineResponse: both are ASGI responses
    routes = [Route(path, handler, methods=[method]) for path, handler, method in handlers]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error})
