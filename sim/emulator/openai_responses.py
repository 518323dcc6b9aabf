"""SGLang's OpenAI Responses API: POST /v1/responses and GET /v1/responses/{id}.

`input` (a string, or a list of messages whose content is a string or text parts) after `instructions`
(a system message) becomes a chat, rendered with the model's template and generated like a chat
completion (`max_output_tokens`, `temperature`, `top_p`, `stop`, `cache_salt`). With `store` (the
default) the response and its conversation are kept (in memory, the last MAX_STORED_RESPONSES and at most
MAX_STORED_CHARS of JSON together), so a
later request can continue it by `previous_response_id` - whose conversation then prefixes the new
input, and so hits the prefix cache. The response object follows OpenAI's (`output` holds one assistant
`message` with one `output_text` part); `usage` carries both the Responses fields (`input_tokens`,
`output_tokens`, their details) and the chat ones SGLang 0.5.x sent (`prompt_tokens`,
`completion_tokens`), so clients of either read it. Streaming sends OpenAI's typed events
(`response.created`, `response.in_progress`, `response.output_item.added`, `response.content_part.added`,
`response.output_text.delta`…, the matching `.done` events, `response.completed`), each as
`event: <type>` / `data: <json>` with a `sequence_number`. Errors are OpenAI-shaped
`{"error": {message, type, param, code}}`.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sim.emulator.emulator import QUEUE_FULL_MESSAGE, Emulator, Generation, Sample
from sim.emulator.openai_api import DISCONNECTED, cache_salt, require_json, sampling_params, usage
from sim.emulator.responses import dumps, event_stream, json_response, read_json_object, wait_unless_disconnected
from sim.emulator.tokenizer import render_chat
from sim.engine import QueueFull

MAX_STORED_RESPONSES = 1024
MAX_STORED_CHARS = 32 * 1024 * 1024  # text of the stored conversations, all together
_ROLES = frozenset({"system", "developer", "user", "assistant"})


def routes(emulator: Emulator) -> list[Route]:
    """The Responses API routes of one emulator."""
    api = _Responses(emulator)
    return [
        Route("/v1/responses", api.create, methods=["POST"]),
        Route("/v1/responses/{response_id}", api.retrieve, methods=["GET"]),
    ]


class _InvalidRequest(ValueError):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def _error(message: str, status: int, param: str | None = None) -> Response:
    err_type = "invalid_request_error" if status < 500 else "server_error"
    return json_response({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                         status_code=status)


def _messages(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise _InvalidRequest("input must be a string or a non-empty list of messages.", "input")
    out = []
    for item in value:
        if not isinstance(item, dict) or item.get("role") not in _ROLES:
            raise _InvalidRequest("each input item must be a message with a role of "
                                  f"{', '.join(sorted(_ROLES))}.", "input")
        content = item.get("content")
        if not isinstance(content, str | list):
            raise _InvalidRequest("a message's content must be a string or a list of parts.", "input")
        out.append({"role": "system" if item["role"] == "developer" else item["role"], "content": content})
    return out


class _Responses:
    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator
        self.stored: OrderedDict[str, tuple[dict[str, Any], list[dict[str, Any]], int]] = OrderedDict()
        self.stored_chars = 0

    async def retrieve(self, request: Request) -> Response:
        """GET /v1/responses/{id}."""
        found = self.stored.get(request.path_params["response_id"])
        if found is None:
            return _error(f"Response with id '{request.path_params['response_id']}' not found.", 404)
        return json_response(found[0])

    async def create(self, request: Request) -> Response:
        """POST /v1/responses."""
        received = time.perf_counter()
        require_json(request)
        body = {**await read_json_object(request), "created_at": int(time.time())}
        emu = self.emu
        try:
            messages = self._conversation(body)
            params = sampling_params({k: v for k, v in body.items() if k in ("temperature", "top_p", "stop",
                                                                             "top_k", "min_p")},
                                     body.get("max_output_tokens"))
            prepared = emu.prepare(render_chat(emu.card, messages), None, params, None, cache_salt(body))
            gen = await emu.generate([prepared], [f"resp_{uuid.uuid4().hex}"], received_wall=received)
        except _InvalidRequest as exc:
            return _error(str(exc), exc.status, exc.param)
        except QueueFull:
            emu.metrics.on_abort()
            return _error(QUEUE_FULL_MESSAGE, 503)
        except ValueError as exc:
            return _error(str(exc), 400)
        sample = gen.samples[0]
        msg_id = f"msg_{uuid.uuid4().hex}"
        if body.get("stream"):
            return event_stream(self._stream(gen, body, messages, msg_id))
        if not await wait_unless_disconnected(request, gen.wait):
            gen.abort(DISCONNECTED)
            return Response(status_code=499)
        reason = sample.state.finish_reason or {}
        if reason.get("type") == "abort" and reason.get("status_code"):
            return _error(str(reason.get("message")), int(reason["status_code"]))
        return json_response(self._finished(sample, body, messages, msg_id))

    def _conversation(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        messages: list[dict[str, Any]] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            if not isinstance(previous, str) or not previous.startswith("resp_"):
                raise _InvalidRequest(f"Invalid 'previous_response_id': '{previous}'. Expected an ID that begins "
                                      "with 'resp'.", "previous_response_id")
            found = self.stored.get(previous)
            if found is None:
                raise _InvalidRequest(f"Previous response with id '{previous}' not found.",
                                      "previous_response_id", 404)
            messages += found[1]
        instructions = body.get("instructions")
        if instructions is not None:
            if not isinstance(instructions, str):
                raise _InvalidRequest("instructions must be a string.", "instructions")
            messages.insert(0, {"role": "system", "content": instructions})
        messages += _messages(body.get("input"))
        return messages

    # ---- response objects -------------------------------------------------------------------

    def _response(self, sample: Sample, body: dict[str, Any], status: str,
                  output: list[dict[str, Any]], with_usage: bool) -> dict[str, Any]:
        return {
            "id": sample.state.rid, "object": "response", "created_at": body["created_at"],
            "model": body.get("model") or self.emu.served_model_name, "output": output, "status": status,
            "usage": self._usage(sample) if with_usage else None,
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "tool_choice": body.get("tool_choice", "auto"), "tools": [], "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": body.get("previous_response_id"), "reasoning": None,
            "store": body.get("store", True), "temperature": body.get("temperature"),
            "text": {"format": {"type": "text"}}, "top_p": body.get("top_p"),
            "truncation": body.get("truncation", "disabled"), "user": body.get("user"),
            "metadata": body.get("metadata") or {},
        }

    def _usage(self, sample: Sample) -> dict[str, Any]:
        chat = usage(self.emu, [sample], 1)
        cached = (chat["prompt_tokens_details"] or {}).get("cached_tokens", 0)
        return {
            "input_tokens": chat["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": chat["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": chat["total_tokens"],
            "prompt_tokens": chat["prompt_tokens"],
            "completion_tokens": chat["completion_tokens"],
        }

    @staticmethod
    def _message(msg_id: str, text: str, status: str) -> dict[str, Any]:
        content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if status == "completed" \
            else []
        return {"id": msg_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def _finished(self, sample: Sample, body: dict[str, Any], messages: list[dict[str, Any]],
                  msg_id: str) -> dict[str, Any]:
        text = self.emu.text(sample.state, sample.prepared.trim)
        response = self._response(sample, body, "completed", [self._message(msg_id, text, "completed")], True)
        if body.get("store", True):
            conversation = [*messages, {"role": "assistant", "content": text}]
            size = len(dumps(conversation))
            self.stored[response["id"]] = (response, conversation, size)
            self.stored_chars += size
            while len(self.stored) > MAX_STORED_RESPONSES or self.stored_chars > MAX_STORED_CHARS:
                self.stored_chars -= self.stored.popitem(last=False)[1][2]
        return response

    async def _stream(self, gen: Generation, body: dict[str, Any], messages: list[dict[str, Any]],
                      msg_id: str) -> AsyncIterator[bytes]:
        sample = gen.samples[0]
        seq = 0

        def event(kind: str, **fields: Any) -> bytes:
            nonlocal seq
            seq += 1
            return b"event: " + kind.encode() + b"\ndata: " + dumps({"type": kind, "sequence_number": seq - 1,
                                                                     **fields}) + b"\n\n"

        where = {"item_id": msg_id, "output_index": 0, "content_index": 0}
        try:
            started = self._response(sample, body, "in_progress", [], False)
            yield event("response.created", response=started)
            yield event("response.in_progress", response=started)
            yield event("response.output_item.added", output_index=0,
                        item=self._message(msg_id, "", "in_progress"))
            yield event("response.content_part.added", **where,
                        part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            async for s in gen.updates():
                reason = s.state.finish_reason or {}
                if reason.get("type") == "abort":
                    yield event("error", code=str(reason.get("status_code") or "abort"),
                                message=str(reason.get("message")), param=None)
                    return
                text = self.emu.text(s.state, s.prepared.trim)
                if len(text) > s.sent_chars:
                    yield event("response.output_text.delta", **where, delta=text[s.sent_chars:], logprobs=[])
                    s.sent_chars = len(text)
            final = self._finished(sample, body, messages, msg_id)
            part = final["output"][0]["content"][0]
            yield event("response.output_text.done", **where, text=part["text"], logprobs=[])
            yield event("response.content_part.done", **where, part=part)
            yield event("response.output_item.done", output_index=0, item=final["output"][0])
            yield event("response.completed", response=final)
        finally:
            if not gen.finished:
                gen.abort(DISCONNECTED)
