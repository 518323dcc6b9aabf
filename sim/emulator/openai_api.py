"""SGLang's OpenAI-compatible routes: /v1/completions, /v1/chat/completions and /v1/models.

Shapes follow SGLang's `openai/protocol.py`, `serving_{completions,chat}.py` and `usage_processor.py`:
request ids `cmpl-…`/`chatcmpl-…`; `n` samples of each prompt (completions also take a batch of
prompts), choice `index` = prompt × n + sample; `usage` counts each prompt's tokens once and every
sample's completion, with `prompt_tokens_details.cached_tokens` when the server reports cached tokens
(SGLang's --enable-cache-report; omitted when nothing was cached, as in SGLang); logprobs in the legacy
completions shape (`tokens`, `token_logprobs`, `top_logprobs` dicts, `text_offset` -1 as SGLang) or
the chat shape (`content` entries with `bytes` and `top_logprobs`); `echo` repeats the prompt (decoded
when it came as token ids), with its logprobs from the first token (whose logprob is null). Streaming:
per sample, text deltas (chat: a role chunk, content chunks, a finish chunk), each with its choice
`index`; a usage chunk with empty `choices` when `stream_options.include_usage`; then `data: [DONE]`.
Request errors are 400 ErrorResponses before the stream starts; a full queue is a 503 ErrorResponse,
or an in-band error event when streaming.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sim.emulator.emulator import QUEUE_FULL_MESSAGE, Emulator, Generation, LogprobOptions, PreparedRequest, Sample
from sim.emulator.logprobs import Entry
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
from sim.emulator.tokenizer import render_chat
from sim.engine import QueueFull

# OpenAI request field -> SGLang sampling parameter
_SAMPLING_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "stop": "stop", "stop_token_ids": "stop_token_ids",
    "stop_regex": "stop_regex", "ignore_eos": "ignore_eos", "no_stop_trim": "no_stop_trim",
    "min_tokens": "min_new_tokens", "n": "n", "seed": "sampling_seed", "skip_special_tokens": "skip_special_tokens",
    "logit_bias": "logit_bias",
}
DISCONNECTED = "Request is disconnected from the client side."


def routes(emulator: Emulator) -> list[Route]:
    """The OpenAI-compatible routes of one emulator."""
    api = _OpenAIRoutes(emulator)
    return [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.retrieve_model, methods=["GET"]),
    ]


def sampling_params(body: dict[str, Any], max_tokens: Any) -> dict[str, Any]:
    """SGLang sampling parameters from an OpenAI request body."""
    params = {sg: body[oa] for oa, sg in _SAMPLING_FIELDS.items() if body.get(oa) is not None}
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
            raise BadRequest("max_tokens must be positive")
        params["max_new_tokens"] = max_tokens
    return params


def cache_salt(body: dict[str, Any]) -> str | None:
    """The request's prefix-cache namespace: SGLang's `cache_salt` and `extra_key`, joined."""
    parts = [body.get("extra_key"), body.get("cache_salt")]
    if any(p is not None and not isinstance(p, str) for p in parts):
        raise BadRequest("cache_salt and extra_key must be strings")
    return "\x00".join(p for p in parts if p) or None


def require_json(request: Request) -> None:
    """SGLang's OpenAI routes accept application/json bodies only."""
    if request.headers.get("content-type", "").split(";", 1)[0].strip().lower() != "application/json":
        raise BadRequest("Unsupported Media Type: Only 'application/json' is allowed")


def streamed_error(sample: Sample) -> bool:
    """The sample was aborted with an HTTP status (full queue, engine failure)."""
    reason = sample.state.finish_reason
    return reason is not None and reason.get("type") == "abort" and bool(reason.get("status_code"))


def error_event(sample: Sample) -> bytes:
    reason = sample.state.finish_reason or {}
    code = int(reason.get("status_code", 500))
    return sse({"error": error_body(str(reason.get("message")), str(reason.get("err_type") or code), code)})


def usage(emu: Emulator, samples: Sequence[Sample], n: int) -> dict[str, Any]:
    """OpenAI `usage` of a request's samples, as SGLang's UsageProcessor counts it: each prompt's tokens
    (and cached tokens) once, from its first sample; every sample's completion."""
    firsts = [s for s in samples if s.index % n == 0]
    prompt = sum(s.state.prompt_tokens for s in firsts)
    completion = sum(s.state.completion_tokens for s in samples)
    cached = sum(s.state.cached_tokens for s in firsts)
    return {
        "prompt_tokens": prompt,
        "total_tokens": prompt + completion,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": cached} if emu.config.enable_cache_report and cached else None,
        "reasoning_tokens": 0,
    }


def _stream_options(body: dict[str, Any]) -> tuple[bool, bool]:
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise BadRequest("stream_options must be an object")
    return bool(opts.get("include_usage")), bool(opts.get("continuous_usage_stats"))


def _finish(sample: Sample) -> tuple[str | None, Any]:
    reason = sample.state.finish_reason
    return (reason["type"], reason.get("matched")) if reason else (None, None)


class _OpenAIRoutes:
    """Handlers of the OpenAI-compatible API for one emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator

    # ---- usage and logprobs -----------------------------------------------------------------

    def completion_logprobs(self, sample: Sample, lo: int, hi: int, with_input: bool) -> dict[str, Any] | None:
        """The legacy completions logprobs of generated tokens lo..hi-1, after the prompt's when `with_input`."""
        if sample.prepared.logprobs is None:
            return None
        tokens, tops = [], []
        if with_input:
            in_tokens, in_tops, _ = self.emu.input_logprobs(sample)
            tokens += in_tokens
            tops += in_tops if in_tops is not None else [None] * len(in_tokens)
        out_tokens, out_tops, _ = self.emu.output_logprobs(sample, lo, hi)
        tokens += out_tokens
        tops += out_tops if out_tops is not None else [None] * len(out_tokens)
        return {
            "text_offset": [-1] * len(tokens),
            "token_logprobs": [e[0] for e in tokens],
            "tokens": [e[2] for e in tokens],
            "top_logprobs": [None if row is None else {e[2]: e[0] for e in row} for row in tops],
        }

    def chat_logprobs(self, sample: Sample, lo: int, hi: int) -> dict[str, Any] | None:
        """The chat logprobs (`content`) of generated tokens lo..hi-1."""
        if sample.prepared.logprobs is None:
            return None
        tokens, tops, _ = self.emu.output_logprobs(sample, lo, hi)
        rows = tops if tops is not None else [[] for _ in tokens]

        def item(e: Entry) -> dict[str, Any]:
            return {"token": e[2], "bytes": list(e[2].encode()), "logprob": e[0]}

        return {"content": [{**item(e), "top_logprobs": [item(t) for t in row]}
                            for e, row in zip(tokens, rows, strict=True)]}

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
        require_json(request)
        body = await read_json_object(request)
        if "prompt" not in body:
            raise BadRequest("1 validation error for CompletionRequest\nprompt\n  Field required")
        prompts = _completion_prompts(body["prompt"])
        if prompts is None:
            return error_response("Prompt cannot be empty", "BadRequestError", 400)
        echo = bool(body.get("echo"))
        want = body.get("logprobs")
        include_usage, continuous = _stream_options(body)
        rid = body.get("rid") if isinstance(body.get("rid"), str) else f"cmpl-{uuid.uuid4().hex}"
        model = body.get("model", "default")
        emu = self.emu
        try:
            logprobs = LogprobOptions.parse(want is not None, 0 if echo else -1, want, None, True)
            params = sampling_params(body, body.get("max_tokens", 16))
            salt = cache_salt(body)
            prepared = [emu.prepare(t, ids, params, logprobs, salt) for t, ids in prompts]
        except ValueError as exc:
            return error_response(str(exc), "BadRequestError", 400)
        n = prepared[0].n
        echoes = [t if t is not None else emu.tokenizer.decode(ids) for t, ids in prompts] if echo else None

        def choice(sample: Sample, text: str, lo: int, hi: int, first: bool) -> dict[str, Any]:
            finish, matched = _finish(sample)
            if first and echoes is not None:
                text = echoes[sample.index // n] + text
            return {"index": sample.index, "text": text,
                    "logprobs": self.completion_logprobs(sample, lo, hi, first and echo),
                    "finish_reason": finish, "matched_stop": matched}

        def final(gen: Generation) -> dict[str, Any]:
            choices = [choice(s, emu.text(s.state, s.prepared.trim), 0, s.state.completion_tokens, True)
                       for s in gen.samples]
            return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                    "choices": choices, "usage": usage(self.emu, gen.samples, n),
                    "metadata": {"weight_version": "default"}}

        async def stream(gen: Generation) -> AsyncIterator[bytes]:
            async for s in gen.updates():
                if streamed_error(s):
                    yield error_event(s)
                    return
                text = emu.text(s.state, s.prepared.trim)
                first = s.sent_tokens == 0 and s.sent_chars == 0
                c = choice(s, text[s.sent_chars:], s.sent_tokens, s.state.completion_tokens, first)
                s.sent_chars = max(s.sent_chars, len(text))
                s.sent_tokens = s.state.completion_tokens
                yield sse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                           "choices": [c], "usage": usage(self.emu, [s], 1) if continuous else None})
            if include_usage:
                total = {k: v for k, v in usage(self.emu, gen.samples, n).items() if v is not None}
                yield sse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
                           "choices": [], "usage": total})

        return await self._serve(request, received, rid, prepared, bool(body.get("stream")), stream, final)

    # ---- /v1/chat/completions ---------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        received = time.perf_counter()
        require_json(request)
        body = await read_json_object(request)
        messages = body.get("messages")
        if "messages" not in body:
            raise BadRequest("1 validation error for ChatCompletionRequest\nmessages\n  Field required")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise BadRequest("messages must be a list of message objects")
        if not messages:
            return error_response("Messages cannot be empty.", "BadRequestError", 400)
        include_usage, continuous = _stream_options(body)
        rid = body.get("rid") if isinstance(body.get("rid"), str) else f"chatcmpl-{uuid.uuid4().hex}"
        model = body.get("model", "default")
        emu = self.emu
        try:
            logprobs = LogprobOptions.parse(body.get("logprobs"), -1, body.get("top_logprobs") or 0, None, True)
            params = sampling_params(body, body.get("max_completion_tokens", body.get("max_tokens")))
            prepared = [emu.prepare(render_chat(emu.card, messages), None, params, logprobs, cache_salt(body))]
        except ValueError as exc:
            return error_response(str(exc), "BadRequestError", 400)
        n = prepared[0].n

        def chunk(sample: Sample, delta: dict[str, Any], logprobs: Any, finish: str | None,
                  matched: Any) -> dict[str, Any]:
            return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
                    "choices": [{"index": sample.index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish, "matched_stop": matched}],
                    "usage": usage(self.emu, [sample], 1) if continuous else None}

        def final(gen: Generation) -> dict[str, Any]:
            choices = []
            for s in gen.samples:
                finish, matched = _finish(s)
                text = emu.text(s.state, s.prepared.trim)
                choices.append({"index": s.index,
                                "message": {"role": "assistant", "content": text or None,
                                            "reasoning_content": None, "tool_calls": None},
                                "logprobs": self.chat_logprobs(s, 0, s.state.completion_tokens),
                                "finish_reason": finish, "matched_stop": matched})
            return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
                    "choices": choices, "usage": usage(self.emu, gen.samples, n),
                    "metadata": {"weight_version": "default"}}

        async def stream(gen: Generation) -> AsyncIterator[bytes]:
            started: set[int] = set()
            async for s in gen.updates():
                if streamed_error(s):
                    yield error_event(s)
                    return
                if s.index not in started:
                    started.add(s.index)
                    yield sse(chunk(s, {"role": "assistant", "content": ""}, None, None, None))
                text = emu.text(s.state, s.prepared.trim)
                delta = text[s.sent_chars:]
                n_tokens = s.state.completion_tokens
                if delta:
                    yield sse(chunk(s, {"role": None, "content": delta},
                                    self.chat_logprobs(s, s.sent_tokens, n_tokens), None, None))
                s.sent_chars = max(s.sent_chars, len(text))
                s.sent_tokens = n_tokens
                if s.state.finished:
                    yield sse(chunk(s, {"role": None, "content": None}, None, *_finish(s)))
            if include_usage:
                yield sse({"id": rid, "object": "chat.completion.chunk", "created": int(time.time()),
                           "model": model, "choices": [], "usage": usage(self.emu, gen.samples, n)})

        return await self._serve(request, received, rid, prepared, bool(body.get("stream")), stream, final)

    # ---- shared -----------------------------------------------------------------------------

    async def _serve(
        self,
        request: Request,
        received: float,
        rid: str,
        prepared: list[PreparedRequest],
        streaming: bool,
        stream: Callable[[Generation], AsyncIterator[bytes]],
        final: Callable[[Generation], dict[str, Any]],
    ) -> Response:
        emu = self.emu
        single = len(prepared) == 1 and prepared[0].n == 1
        try:
            gen = await emu.generate(prepared, [rid] if single else None, received_wall=received)
        except QueueFull:
            emu.metrics.on_abort()
            if streaming:
                return event_stream(events(
                    sse({"error": error_body(QUEUE_FULL_MESSAGE, "SERVICE_UNAVAILABLE", 503)}), SSE_DONE))
            return error_response(QUEUE_FULL_MESSAGE, "SERVICE_UNAVAILABLE", 503)
        except ValueError as exc:
            return error_response(str(exc), "BadRequestError", 400)
        if streaming:
            return event_stream(_guarded(gen, stream(gen)))
        if not await wait_unless_disconnected(request, gen.wait):
            gen.abort(DISCONNECTED)
            return Response(status_code=499)
        for s in gen.samples:
            if streamed_error(s):
                reason = s.state.finish_reason or {}
                code = int(reason["status_code"])
                return error_response(str(reason.get("message")), str(reason.get("err_type") or code), code)
        return json_response(final(gen))


async def _guarded(gen: Generation, chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """Frame a stream with [DONE], and abort the request if the client leaves before the end."""
    try:
        async for c in chunks:
            yield c
        yield SSE_DONE
    finally:
        if not gen.finished:
            gen.abort(DISCONNECTED)


def _completion_prompts(prompt: Any) -> list[tuple[str | None, list[int] | None]] | None:
    """A completions `prompt` (a string, token ids, or a batch of either) as [(text, ids)]; None if empty."""
    if not prompt:
        return None
    if isinstance(prompt, str):
        return [(prompt, None)]
    if isinstance(prompt, list) and all(isinstance(p, str) for p in prompt):
        return [(p, None) for p in prompt]
    if isinstance(prompt, list) and all(isinstance(p, list) for p in prompt):
        return [(None, p) for p in prompt]
    if isinstance(prompt, list):
        return [(None, prompt)]
    raise BadRequest("prompt must be a string, a list of strings, a list of token ids or a list of lists of them")
