"""What the gateway accepts, and how a request becomes the pipeline's InferenceRequests.

The bodies of `/v1/chat/completions`, `/v1/completions` and SGLang's native `/generate` are parsed strictly
(unknown fields refused, types not coerced from strings, every number finite and bounded, every list and
string bounded) into the models below, then mapped to InferenceRequests whose `api` says which engine API
serves them (lodestar/schemas.py EngineApi). A batch of prompts (completions `prompt: [...]`, native `text:
[...]` / `input_ids: [[...]]`) becomes one InferenceRequest per prompt, routed on its own, and the answers
are merged back (choice `index` = prompt × n + sample, as SGLang numbers them). `n` samples of one prompt
stay one request: the engine prefills the prompt once for all of them.

Supported beyond OpenAI's own parameters: SGLang's sampling extras (`top_k`, `min_p`, `repetition_penalty`,
`min_tokens`, `stop_token_ids`, `stop_regex`, `ignore_eos`, `skip_special_tokens`, `no_stop_trim`) and
`cache_salt`. Refused (400, unsupported parameter): tools and function calls, structured output
(`response_format`, regex/JSON-schema/EBNF constraints), logit biases, LoRA adapters, images and audio.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lodestar.schemas import (
    MAX_LIST_ITEMS,
    MAX_MESSAGES,
    MAX_N,
    MAX_PATTERN_CHARS,
    MAX_TOKENS,
    MAX_TOP_LOGPROBS,
    ChatMessage,
    EngineApi,
    EngineApiKind,
    FiniteFloat,
    InferenceRequest,
    SamplingParams,
    TokenId,
)

MAX_BATCH = 64  # prompts in one completions or /generate request
MAX_PROMPT_TOKENS = 1_000_000
MAX_STOP_CHARS = 1024
DEFAULT_ESTIMATE_TOKENS = 256  # the router's guess of an answer's length when the request sets no limit

Stop = str | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_LIST_ITEMS)]
StopRegex = (Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]
             | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]],
                         Field(max_length=MAX_LIST_ITEMS)])
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    """The sampling parameters the OpenAI routes and /generate name alike (SGLang's extras among them)."""

    top_k: int = Field(-1, ge=-1, le=2**31 - 1)
    min_p: FiniteFloat = Field(0.0, ge=0.0, le=1.0)
    frequency_penalty: FiniteFloat = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: FiniteFloat = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: FiniteFloat = Field(1.0, gt=0.0, le=2.0)
    stop: Stop | None = None
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_LIST_ITEMS)] | None = None
    stop_regex: StopRegex | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False

    def options_with(self, min_tokens: int, seed: int | None, cache_salt: str | None) -> dict[str, Any]:
        """EngineApi fields of these parameters and the ones named differently per API."""
        regex = self.stop_regex
        return {
            "top_k": self.top_k, "min_p": self.min_p, "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty, "repetition_penalty": self.repetition_penalty,
            "min_tokens": min_tokens, "seed": seed, "stop_token_ids": list(self.stop_token_ids or ()),
            "stop_regex": [regex] if isinstance(regex, str) else list(regex or ()),
            "skip_special_tokens": self.skip_special_tokens, "no_stop_trim": self.no_stop_trim,
            "cache_salt": cache_salt,
        }

    def sampling_with(self, estimate: int, temperature: float, top_p: float) -> SamplingParams:
        """The request's SamplingParams (`estimate`: the router's guess of the answer's length)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        return SamplingParams(max_new_tokens=max(1, min(estimate, MAX_TOKENS)), temperature=temperature,
                              top_p=top_p, stop=stop, ignore_eos=self.ignore_eos)


class _SamplingExtras(_Sampling):
    """The OpenAI routes' sampling parameters (unset temperature and top_p: OpenAI's defaults, 1)."""

    temperature: FiniteFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: FiniteFloat | None = Field(None, gt=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    cache_salt: str | None = Field(None, min_length=1, max_length=256)

    def engine_options(self) -> dict[str, Any]:
        return self.options_with(self.min_tokens, self.seed, self.cache_salt)

    def sampling(self, estimate: int) -> SamplingParams:
        return self.sampling_with(estimate, 1.0 if self.temperature is None else self.temperature,
                                  1.0 if self.top_p is None else self.top_p)


class _OpenAIRequest(_SamplingExtras):
    model: str = Field(min_length=1, max_length=256)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)  # accepted, not used

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatRequest(_OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_OpenAIRequest):
    """POST /v1/completions."""

    prompt: (Annotated[str, Field(min_length=1)] | TokenIds
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_BATCH)]
             | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_BATCH)])
    max_tokens: int = Field(16, ge=1, le=MAX_TOKENS)  # OpenAI's and SGLang's default
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1, le=1)
    suffix: None = None


class NativeSampling(_Sampling):
    """The `sampling_params` of /generate (SGLang's names)."""

    max_new_tokens: int = Field(128, ge=0, le=MAX_TOKENS)  # SGLang's default
    temperature: FiniteFloat = Field(1.0, ge=0.0, le=100.0)
    top_p: FiniteFloat = Field(1.0, gt=0.0, le=1.0)
    min_new_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    sampling_seed: int | None = Field(None, ge=0, le=2**63 - 1)
    spaces_between_special_tokens: bool = True
    n: int = Field(1, ge=1, le=MAX_N)


class GenerateRequest(_Strict):
    """POST /generate (SGLang's native API; one prompt or a batch)."""

    text: (Annotated[str, Field(min_length=1)]
           | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_BATCH)]
           | None) = None
    input_ids: TokenIds | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_BATCH)] | None = None
    sampling_params: NativeSampling = Field(default_factory=NativeSampling)
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    logprob_start_len: int = Field(-1, ge=-1, le=MAX_TOKENS)
    return_text_in_logprobs: bool = False
    token_ids_logprob: Annotated[list[TokenId], Field(max_length=MAX_LIST_ITEMS)] | None = None
    cache_salt: str | None = Field(None, min_length=1, max_length=256)
    lora_path: None = None
    return_routed_experts: Literal[False] = False
    log_metrics: bool = True  # accepted, not used

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("exactly one of `text` or `input_ids` is required")
        return self


@dataclass(frozen=True)
class Plan:
    """One HTTP request as the pipeline serves it: its InferenceRequests (one per prompt) and what the answer
    must look like."""

    route: EngineApiKind
    requests: list[InferenceRequest]
    n: int
    batch: bool  # the client sent a list of prompts (the answer is indexed across them)
    stream: bool
    include_usage: bool
    model: str
    response_id: str


def _prompts(prompt: Any) -> tuple[list[tuple[str | None, list[int] | None]], bool]:
    """A completions prompt or native input as [(text, ids)], and whether it was a batch."""
    if isinstance(prompt, str):
        return [(prompt, None)], False
    if prompt and isinstance(prompt[0], int):
        return [(None, list(prompt))], False
    return [(p, None) if isinstance(p, str) else (None, list(p)) for p in prompt], True


def _request(text: str | None, ids: list[int] | None, sampling: SamplingParams, api: EngineApi, stream: bool,
             base: dict[str, Any]) -> InferenceRequest:
    return InferenceRequest(prompt=text, input_ids=ids, sampling=sampling, api=api, stream=stream, **base)


def plan_chat(body: ChatRequest, base: dict[str, Any]) -> Plan:
    """A chat: one request carrying the messages (the engine applies the chat template)."""
    limit = body.limit
    api = EngineApi(kind="chat", max_tokens=limit, n=body.n, logprobs=body.logprobs,
                    top_logprobs=body.top_logprobs or 0, **body.engine_options())
    request = InferenceRequest(messages=body.messages, sampling=body.sampling(limit or DEFAULT_ESTIMATE_TOKENS),
                               api=api, stream=body.stream, **base)
    return Plan("chat", [request], body.n, False, body.stream, body.include_usage, body.model,
                f"chatcmpl-{request.request_id}")


def plan_completion(body: CompletionRequest, base: dict[str, Any]) -> Plan:
    """A completion: one request per prompt of the batch."""
    prompts, batch = _prompts(body.prompt)
    api = EngineApi(kind="completions", max_tokens=body.max_tokens, n=body.n, logprobs=body.logprobs is not None,
                    top_logprobs=body.logprobs or 0, echo=body.echo, **body.engine_options())
    sampling = body.sampling(body.max_tokens)
    requests = [_request(t, i, sampling, api, body.stream, _sub(base, k, len(prompts)))
                for k, (t, i) in enumerate(prompts)]
    return Plan("completions", requests, body.n, batch, body.stream, body.include_usage, body.model,
                f"cmpl-{base['request_id']}")


def plan_generate(body: GenerateRequest, base: dict[str, Any]) -> Plan:
    """A native /generate: one request per prompt of the batch."""
    prompts, batch = _prompts(body.text if body.text is not None else body.input_ids)
    sp = body.sampling_params
    api = EngineApi(kind="generate", max_tokens=sp.max_new_tokens, n=sp.n, logprobs=body.return_logprob,
                    top_logprobs=body.top_logprobs_num, logprob_start_len=body.logprob_start_len,
                    return_text_in_logprobs=body.return_text_in_logprobs, token_ids_logprob=body.token_ids_logprob,
                    **sp.options_with(sp.min_new_tokens, sp.sampling_seed, body.cache_salt))
    sampling = sp.sampling_with(sp.max_new_tokens, sp.temperature, sp.top_p)
    requests = [_request(t, i, sampling, api, body.stream, _sub(base, k, len(prompts)))
                for k, (t, i) in enumerate(prompts)]
    return Plan("generate", requests, sp.n, batch, body.stream, False, "", base["request_id"])


def _sub(base: dict[str, Any], k: int, total: int) -> dict[str, Any]:
    """The base fields of sub-request k of `total` (ids `<id>-<k>` when there are several)."""
    return base if total == 1 else {**base, "request_id": f"{base['request_id']}-{k}"}


def new_base(reply_to: str, deadline_ms: float, session_id: str | None, metadata: dict[str, str]) -> dict[str, Any]:
    """The fields every InferenceRequest of one HTTP request shares."""
    return {"request_id": uuid.uuid4().hex, "reply_to": reply_to, "deadline_ms": deadline_ms,
            "session_id": session_id, "metadata": metadata}
