"""Serving a request through one of the engine's APIs, and reading its stream (issue 14).

`engine_call(request)` is the engine request: SGLang's `/v1/chat/completions` for a chat, `/v1/completions`,
or native `/generate`, always streamed (the worker times the first token), with the request id as SGLang's
`rid` (so `/abort_request` finds it) and usage in the stream. `StreamCollector` reads that stream's events
(dicts, in order) for what the worker needs whatever the API: when output starts, token counts, the finish
reason, choice 0's text, and the response the engine would have answered without streaming (`body()`), for
a client that did not ask for a stream.

Shapes (SGLang 0.5.x, and the emulator): chat events carry `choices[i].delta.content` and chat logprobs
(`logprobs.content`), completions events `choices[i].text` and legacy logprobs (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`), both incremental, with `usage` on the last event; native `/generate` events
are cumulative (`text`, `meta_info` with the token counts and logprobs so far), one per change, tagged with
`index` when there are several choices. An event `{"error": {...}}` is the engine refusing or failing
mid-stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lodestar.schemas import EngineApi, InferenceRequest

CHAT_PATH, COMPLETIONS_PATH, GENERATE_PATH = "/v1/chat/completions", "/v1/completions", "/generate"


@dataclass(frozen=True)
class EngineCall:
    """One streamed engine request: where, and the JSON body."""

    path: str
    body: dict[str, Any]


def _sampling(request: InferenceRequest, api: EngineApi) -> dict[str, Any]:
    """SGLang sampling parameters of a request (the native API's names)."""
    s = request.sampling
    params: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "ignore_eos": s.ignore_eos,
                              "n": api.n}
    if s.stop:
        params["stop"] = list(s.stop)
    if api.max_tokens is not None:
        params["max_new_tokens"] = api.max_tokens
    for name, default in (("frequency_penalty", 0.0), ("presence_penalty", 0.0), ("repetition_penalty", 1.0),
                          ("top_k", -1), ("min_p", 0.0), ("skip_special_tokens", True), ("no_stop_trim", False)):
        value = getattr(api, name)
        if value != default:
            params[name] = value
    if api.min_tokens:
        params["min_new_tokens"] = api.min_tokens
    if api.seed is not None:
        params["sampling_seed"] = api.seed
    if api.stop_token_ids:
        params["stop_token_ids"] = list(api.stop_token_ids)
    if api.stop_regex:
        params["stop_regex"] = list(api.stop_regex) if len(api.stop_regex) > 1 else api.stop_regex[0]
    return params


# the OpenAI routes' names of native sampling parameters that differ
_OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "sampling_seed": "seed"}


def engine_call(request: InferenceRequest) -> EngineCall:
    """The streamed engine request that serves `request` through its API (see the module doc)."""
    api = request.api or EngineApi(kind=request.engine_api, max_tokens=request.sampling.max_new_tokens)
    params = _sampling(request, api)
    if api.kind == "generate":
        body: dict[str, Any] = {"sampling_params": params, "stream": True, "rid": request.request_id}
        if request.input_ids:
            body["input_ids"] = list(request.input_ids)
        else:
            body["text"] = request.prompt
        if api.logprobs:
            body.update(return_logprob=True, top_logprobs_num=api.top_logprobs,
                        logprob_start_len=api.logprob_start_len, return_text_in_logprobs=api.return_text_in_logprobs)
            if api.token_ids_logprob is not None:
                body["token_ids_logprob"] = list(api.token_ids_logprob)
        if api.cache_salt is not None:
            body["cache_salt"] = api.cache_salt
        if request.priority is not None:
            body["priority"] = request.priority
        return EngineCall(GENERATE_PATH, body)
    body = {_OPENAI_NAMES.get(k, k): v for k, v in params.items()}
    body.update(stream=True, stream_options={"include_usage": True}, rid=request.request_id)
    if api.cache_salt is not None:
        body["cache_salt"] = api.cache_salt
    if request.priority is not None:  # SGLang's OpenAI APIs take it too (`--enable-priority-scheduling`)
        body["priority"] = request.priority
    if api.kind == "chat":
        body["messages"] = [m.model_dump(exclude_none=True) for m in request.messages or ()]
        if api.logprobs:
            body.update(logprobs=True, top_logprobs=api.top_logprobs)
        return EngineCall(CHAT_PATH, body)
    body["prompt"] = list(request.input_ids) if request.input_ids else request.prompt
    if api.logprobs:
        body["logprobs"] = api.top_logprobs
    if api.echo:
        body["echo"] = True
    return EngineCall(COMPLETIONS_PATH, body)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0 else 0


class StreamCollector:
    """Reads one engine stream's events, whatever the API (see the module doc)."""

    def __init__(self, kind: str, n: int = 1):
        self.kind = kind
        self.n = n
        self._choices: dict[int, dict[str, Any]] = {}
        self._head: dict[str, Any] = {}
        self._usage: dict[str, Any] | None = None
        self.events = 0

    def observe(self, event: dict[str, Any]) -> bool:
        """Take one event; True if it carries output (the first such event is the first token)."""
        self.events += 1
        if self.kind == "generate":
            return self._observe_native(event)
        if not self._head:
            self._head = {k: event.get(k) for k in ("id", "created", "model")}
        usage = event.get("usage")
        if isinstance(usage, dict) and not event.get("choices"):
            self._usage = usage
        output = False
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                continue
            index = _int(choice.get("index"))
            acc = self._choices.setdefault(index, {"index": index, "text": "", "logprobs": None,
                                                   "finish_reason": None, "matched_stop": None})
            piece = (choice.get("delta") or {}).get("content") if self.kind == "chat" else choice.get("text")
            if isinstance(piece, str) and piece:
                acc["text"] += piece
                output = True
            self._merge_logprobs(acc, choice.get("logprobs"))
            if choice.get("finish_reason") is not None:
                acc["finish_reason"] = choice["finish_reason"]
                acc["matched_stop"] = choice.get("matched_stop")
        return output

    def _merge_logprobs(self, acc: dict[str, Any], logprobs: Any) -> None:
        if not isinstance(logprobs, dict):
            return
        if acc["logprobs"] is None:
            acc["logprobs"] = {k: list(v) for k, v in logprobs.items() if isinstance(v, list)}
            return
        for key, values in logprobs.items():
            if isinstance(values, list):
                acc["logprobs"].setdefault(key, []).extend(values)

    def _observe_native(self, event: dict[str, Any]) -> bool:
        index = _int(event.get("index"))
        before = self._choices.get(index)
        self._choices[index] = event
        meta = event.get("meta_info") if isinstance(event.get("meta_info"), dict) else {}
        had = _int((before or {}).get("meta_info", {}).get("completion_tokens")) if before else 0
        text = event.get("text")
        return bool(isinstance(text, str) and text and before is None) or _int(meta.get("completion_tokens")) > had

    # ---- what the worker reports -----------------------------------------------------------------

    def _meta(self, index: int) -> dict[str, Any]:
        event = self._choices.get(index) or {}
        meta = event.get("meta_info")
        return meta if isinstance(meta, dict) else {}

    @property
    def prompt_tokens(self) -> int:
        if self.kind == "generate":
            return _int(self._meta(0).get("prompt_tokens"))
        return _int((self._usage or {}).get("prompt_tokens"))

    @property
    def cached_tokens(self) -> int:
        if self.kind == "generate":
            return _int(self._meta(0).get("cached_tokens"))
        details = (self._usage or {}).get("prompt_tokens_details")
        return _int(details.get("cached_tokens")) if isinstance(details, dict) else 0

    @property
    def completion_tokens(self) -> int:
        if self.kind == "generate":
            return sum(_int(self._meta(i).get("completion_tokens")) for i in self._choices)
        return _int((self._usage or {}).get("completion_tokens"))

    @property
    def finish_reason(self) -> Any:
        """Choice 0's finish reason (SGLang's native object, or the OpenAI string)."""
        if self.kind == "generate":
            return self._meta(0).get("finish_reason")
        return (self._choices.get(0) or {}).get("finish_reason")

    @property
    def text(self) -> str:
        """Choice 0's text."""
        text = (self._choices.get(0) or {}).get("text")
        return text if isinstance(text, str) else ""

    @property
    def finished(self) -> bool:
        """Whether the stream produced any usable event."""
        return bool(self._choices) or self._usage is not None

    def body(self) -> Any:
        """The response the engine answers without streaming: SGLang's output object (a list of them for several
        choices) for /generate; the chat.completion or text_completion object with usage for the OpenAI APIs."""
        indexes = sorted(self._choices)
        if self.kind == "generate":
            outs = [{k: v for k, v in self._choices[i].items() if k != "index"} for i in indexes]
            return outs[0] if self.n == 1 and len(outs) == 1 else outs
        choices = []
        for i in indexes:
            acc = self._choices[i]
            if self.kind == "chat":
                choices.append({"index": i, "message": {"role": "assistant", "content": acc["text"] or None,
                                                        "reasoning_content": None, "tool_calls": None},
                                "logprobs": acc["logprobs"], "finish_reason": acc["finish_reason"],
                                "matched_stop": acc["matched_stop"]})
            else:
                choices.append(dict(acc))
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {**self._head, "object": obj, "choices": choices, "usage": self._usage}
