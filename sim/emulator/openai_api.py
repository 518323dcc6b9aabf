"""SGLang's OpenAI-compatible routes: /v1/completions, /v1/chat/completions and /v1/models.

Shapes follow SGLang's `openai_api/protocol.py` and `serving_{completions,chat}.py`: request ids
`cmpl-…`/`chatcmpl-…`, `usage` with `prompt_tokens_details.cached_tokens` when the server reports
cached tokens (SGLang's --enable-cache-report; omitted when nothing was cached, as in SGLang), streaming
deltas (chat: a role chunk, content chunks, a finish chunk), a usage chunk with empty `choices` when
`stream_options.include_usage`, then `data: [DONE]`. Request errors are 400 ErrorResponses before the
stream starts; a full queue is a 503 ErrorResponse, or an in-band error event when streaming.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sim.emulator.emulator import QUEUE_FULL_MESSAGE, Emulator, PreparedRequest
from sim.emulator.responses import (
    SSE_DONE,
    BadRequest,
    error_body,
    error_response,
    event_stream,
    events,
    json_response,
    read_json_object,
    sse,
    wait_unless_disconnected,
)
from sim.emulator.runner import RequestState
from sim.emulator.tokenizer import render_chat
from sim.engine import QueueFull

# OpenAI request field -> SGLang sampling parameter
_SAMPLING_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "stop": "stop", "stop_token_ids": "stop_token_ids",
    "ignore_eos": "ignore_eos", "no_stop_trim": "no_stop_trim", "min_tokens": "min_new_tokens",
    "n": "n", "seed": "sampling_seed", "skip_special_tokens": "skip_special_tokens",
}


def routes(emulator: Emulator) -> list[Route]:
    """The OpenAI-compatible routes of one emulator."""
    api = _OpenAIRoutes(emulator)
    return [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.retrieve_model, methods=["GET"]),
    ]


def _sampling_params(body: dict[str, Any], max_tokens: Any) -> dict[str, Any]:
    params = {sg: body[oa] for oa, sg in _SAMPLING_FIELDS.items() if body.get(oa) is not None}
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise BadRequest("max_tokens must be positive")
        params["max_new_tokens"] = max_tokens
    return params


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object")
    return bool(opts.get("include_usage")), bool(opts.get("continuous_usage_stats"))


class _OpenAIRoutes:
    """Handlers of the OpenAI-compatible API for one emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator

    def usage(self, state: RequestState) -> dict[str, Any]:
        """OpenAI `usage`, with SGLang's cache report."""
        cached = state.cached_tokens
        details = {"cached_tokens": cached} if self.emu.config.enable_cache_report and cached > 0 else None
        return {
            "prompt_tokens": state.prompt_tokens,
            "total_tokens": state.prompt_tokens + state.completion_tokens,
            "completion_tokens": state.completion_tokens,
            "prompt_tokens_details": details,
            "reasoning_tokens": 0,
        }

    # ---- /v1/models -------------------------------------------------------------------------

    def _model_card(self) -> dict[str, Any]:
        name = self.emu.served_model_name
        return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "sglang",
                "root": name, "parent": None, "max_model_len": self.emu.context_len}

    async def models(self, _: Request) -> Response:
        """GET /v1/models."""
        return json_response({"object": "list", "data": [self._model_card()]})

    async def retrieve_model(self, request: Request) -> Response:
        """GET /v1/models/{model}."""
        if request.path_params["model"] != self.emu.served_model_name:
            return json_response({"error": {
                "message": f"The model '{request.path_params['model']}' does not exist",
                "type": "invalid_request_error", "param": "model", "code": "model_not_found",
            }}, status_code=404)
        return json_response(self._model_card())

    # ---- /v1/completions --------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        """POST /v1/completions."""
        received = time.perf_counter()
        _require_json(request)
        body = await read_json_object(request)
        if "prompt" not in body:
            raise BadRequest("1 validation error for CompletionRequest\nprompt\n  Field required")
        prompt = body["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        if not prompt:
            return error_response("Prompt cannot be empty", "BadRequestError", 400)
        if isinstance(prompt, list) and isinstance(prompt[0], str | list):
            return error_response("Batched requests are not supported by the emulator.", "BadRequestError", 400)
        text, ids = (prompt, None) if isinstance(prompt, str) else (None, prompt)
        params = _sampling_params(body, body.get("max_tokens", 16))
        include_usage, continuous = _stream_options(body)
        rid = body.get("rid") or f"cmpl-{uuid.uuid4().hex}"
        echo = prompt if body.get("echo") and isinstance(prompt, str) else ""
        model = body.get("model", "default")

        def chunk(state: RequestState, delta: str, finish: dict[str, Any] | None) -> dict[str, Any]:
            return {"id": state.rid, "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "text": delta, "logprobs": None,
                                 "finish_reason": finish["type"] if finish else None,
                                 "matched_stop": finish.get("matched") if finish else None}],
                    "usage": self.usage(state) if continuous else None}

        def final(state: RequestState, text_out: str) -> dict[str, Any]:
            reason = state.finish_reason or {}
            return {"id": state.rid, "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0, "text": echo + text_out, "logprobs": None,
                                 "finish_reason": reason.get("type"), "matched_stop": reason.get("matched")}],
                    "usage": self.usage(state), "metadata": {"weight_version": "default"}}

        def usage_chunk(state: RequestState) -> dict[str, Any]:
            usage = {k: v for k, v in self.usage(state).items() if v is not None}
            return {"id": state.rid, "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": [], "usage": usage}

        async def stream(state: RequestState, prepared: PreparedRequest) -> AsyncIterator[bytes]:
            sent = 0
            first = True
            async for current in self.emu.updates(state):
                text_out = self.emu.text(current, prepared.no_stop_trim)
                delta = text_out[sent:]
                sent = max(sent, len(text_out))
                if first:
                    delta, first = echo + delta, False
                if _streamed_error(current):
                    yield _error_event(current)
                    break
                yield sse(chunk(current, delta, current.finish_reason))
            if include_usage and state.finished:
                yield sse(usage_chunk(state))

        return await self._serve(request, received, rid, text, ids, params, bool(body.get("stream")), stream,
                                 final)

    # ---- /v1/chat/completions ---------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        received = time.perf_counter()
        _require_json(request)
        body = await read_json_object(request)
        messages = body.get("messages")
        if "messages" not in body:
            raise BadRequest("1 validation error for ChatCompletionRequest\nmessages\n  Field required")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a list of message objects")
        if not messages:
            return error_response("Messages cannot be empty.", "BadRequestError", 400)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        params = _sampling_params(body, max_tokens)
        include_usage, continuous = _stream_options(body)
        rid = body.get("rid") or f"chatcmpl-{uuid.uuid4().hex}"
        prompt = render_chat(self.emu.card, messages)
        model = body.get("model", "default")

        def chunk(state: RequestState, delta: dict[str, Any], finish: dict[str, Any] | None) -> dict[str, Any]:
            return {"id": state.rid, "object": "chat.completion.chunk", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                 "finish_reason": finish["type"] if finish else None,
                                 "matched_stop": finish.get("matched") if finish else None}],
                    "usage": self.usage(state) if continuous else None}

        def final(state: RequestState, text_out: str) -> dict[str, Any]:
            reason = state.finish_reason or {}
            return {"id": state.rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": [{"index": 0,
                                 "message": {"role": "assistant", "content": text_out or None,
                                             "reasoning_content": None, "tool_calls": None},
                                 "logprobs": None, "finish_reason": reason.get("type"),
                                 "matched_stop": reason.get("matched")}],
                    "usage": self.usage(state), "metadata": {"weight_version": "default"}}

        async def stream(state: RequestState, prepared: PreparedRequest) -> AsyncIterator[bytes]:
            sent = 0
            first = True
            async for current in self.emu.updates(state):
                if _streamed_error(current):
                    yield _error_event(current)
                    break
                if first:
                    first = False
                    yield sse(chunk(current, {"role": "assistant", "content": ""}, None))
                text_out = self.emu.text(current, prepared.no_stop_trim)
                delta = text_out[sent:]
                sent = max(sent, len(text_out))
                if delta:
                    yield sse(chunk(current, {"role": None, "content": delta}, None))
                if current.finished:
                    yield sse(chunk(current, {"role": None, "content": None}, current.finish_reason))
            if include_usage and state.finished:
                yield sse({"id": state.rid, "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model, "choices": [], "usage": self.usage(state)})

        return await self._serve(request, received, rid, prompt, None, params, bool(body.get("stream")), stream,
                                 final)

    # ---- shared -----------------------------------------------------------------------------

    async def _serve(
        self,
        request: Request,
        received: float,
        rid: str,
        text: str | None,
        ids: Any,
        params: dict[str, Any],
        streaming: bool,
        stream: Callable[[RequestState, PreparedRequest], AsyncIterator[bytes]],
        final: Callable[[RequestState, str], dict[str, Any]],
    ) -> Response:
        emu = self.emu
        try:
            prepared = emu.prepare(text, ids, params)
        except ValueError as exc:
            return error_response(str(exc), "BadRequestError", 400)
        try:
            state = emu.submit(rid, prepared, received_wall=received)
        except QueueFull:
            emu.metrics.on_abort()
            if streaming:
                return event_stream(events(
                    sse({"error": error_body(QUEUE_FULL_MESSAGE, "SERVICE_UNAVAILABLE", 503)}), SSE_DONE))
            return error_response(QUEUE_FULL_MESSAGE, "SERVICE_UNAVAILABLE", 503)
        except ValueError as exc:
            return error_response(str(exc), "BadRequestError", 400)
        if streaming:
            return event_stream(self._guarded(state, stream(state, prepared)))
        if not await wait_unless_disconnected(request, state.wait_finished):
            emu.runner.abort(rid, "Request is disconnected from the client side.")
            return Response(status_code=499)
        if _streamed_error(state):
            reason = state.finish_reason or {}
            code = int(reason["status_code"])
            return error_response(str(reason.get("message")), str(reason.get("err_type") or code), code)
        return json_response(final(state, emu.text(state, prepared.no_stop_trim)))

    async def _guarded(self, state: RequestState, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """Frame a stream with [DONE], and abort the request if the client leaves before the end."""
        try:
            async for c in chunks:
                yield c
            yield SSE_DONE
        finally:
            if not state.finished:
                self.emu.runner.abort(state.rid, "Request is disconnected from the client side.")


def _require_json(request: Request) -> None:
    """SGLang's OpenAI routes accept application/json bodies only."""
    if request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != "application/json":
        raise BadRequest("Unsupported Media Type: Only 'application/json' is allowed")


def _streamed_error(state: RequestState) -> bool:
    reason = state.finish_reason
    return reason is not None and reason.get("type") == "abort" and bool(reason.get("status_code"))


def _error_event(state: RequestState) -> bytes:
    reason = state.finish_reason or {}
    code = int(reason.get("status_code", 500))
    return sse({"error": error_body(str(reason.get("message")), str(reason.get("err_type") or code), code)})
