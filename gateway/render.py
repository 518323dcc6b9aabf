"""The client's answer, from what the workers sent back (engine events or engine response bodies).

Each InferenceRequest of a plan (gateway/request_models.py) comes back as pieces: with `stream`, the engine's
stream events in order; without, the response the engine would have answered, built by the worker. What this
module changes in them:

- the OpenAI APIs: `id` (one id for the whole answer: `chatcmpl-<request id>`, `cmpl-<request id>`) and
  `model` (the name the client asked for); a batch's choices renumbered across prompts (`index` = prompt × n +
  sample); usage summed over the batch's prompts; the engine's usage event (the worker always asks for it, to
  count tokens) forwarded only when the client asked for `stream_options.include_usage`, as the last event;
- native /generate: a batch's outputs in prompt order (a list), streamed events tagged with their `index`
  across prompts; a single prompt's pieces pass through unchanged.
"""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.request_models import Plan

SSE_DONE = b"data: [DONE]\n\n"


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(payload: bytes | str) -> bytes:
    """One server-sent event."""
    data = payload.encode() if isinstance(payload, str) else payload
    return b"data: " + data + b"\n\n"


def sum_usage(usages: list[dict[str, Any]]) -> dict[str, Any] | None:
    """OpenAI usage of several prompts: token counts added (cached tokens too, when any prompt reports them)."""
    if not usages:
        return None
    if len(usages) == 1:
        return usages[0]
    total: dict[str, Any] = {k: sum(int(u.get(k) or 0) for u in usages)
                             for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    details = [u.get("prompt_tokens_details") for u in usages]
    if any(isinstance(d, dict) for d in details):
        total["prompt_tokens_details"] = {
            "cached_tokens": sum(int(d.get("cached_tokens") or 0) for d in details if isinstance(d, dict))}
    return total


class StreamRenderer:
    """Turns one plan's streamed pieces (from request `k`) into SSE events for the client."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self._usages: dict[int, dict[str, Any]] = {}
        self._created = int(time.time())

    def event(self, k: int, piece: str) -> bytes | None:
        """The SSE event for a piece of request k, or None when it is held back (a usage event)."""
        plan = self.plan
        if plan.route == "generate":
            if not plan.batch:
                return sse(piece)
            event = json.loads(piece)
            event["index"] = k * plan.n + int(event.get("index") or 0)
            return sse(dumps(event))
        event = json.loads(piece)
        choices = event.get("choices")
        if not choices and isinstance(event.get("usage"), dict):
            self._usages[k] = event["usage"]
            return None
        event["id"] = plan.response_id
        event["model"] = plan.model
        if plan.batch and isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    choice["index"] = k * plan.n + int(choice.get("index") or 0)
        return sse(dumps(event))

    def closing(self) -> list[bytes]:
        """What follows the last piece: the usage event (if asked for), then [DONE]."""
        out = []
        plan = self.plan
        if plan.include_usage and plan.route != "generate":
            usage = sum_usage([self._usages[k] for k in sorted(self._usages)])
            obj = "chat.completion.chunk" if plan.route == "chat" else "text_completion"
            out.append(sse(dumps({"id": plan.response_id, "object": obj, "created": self._created,
                                  "model": plan.model, "choices": [], "usage": usage})))
        out.append(SSE_DONE)
        return out


def body(plan: Plan, pieces: list[str]) -> bytes:
    """The whole answer, from each request's response body (pieces[k] for request k)."""
    bodies = [json.loads(p) for p in pieces]
    if plan.route == "generate":
        if not plan.batch:
            return pieces[0].encode()
        outs: list[Any] = []
        for b in bodies:
            outs.extend(b if isinstance(b, list) else [b])
        return dumps(outs)
    merged = bodies[0]
    merged["id"] = plan.response_id
    merged["model"] = plan.model
    if plan.batch:
        choices = []
        for k, b in enumerate(bodies):
            for choice in b.get("choices") or ():
                choice["index"] = k * plan.n + int(choice.get("index") or 0)
                choices.append(choice)
        merged["choices"] = choices
        merged["usage"] = sum_usage([b["usage"] for b in bodies if isinstance(b.get("usage"), dict)])
    return dumps(merged)
