"""Message contracts between services (docs/architecture.md "Contracts"), JSON on the wire.

Every message carries `schema_version`; validation is strict (unknown fields are rejected, types are
not coerced from strings) so that bad input fails loudly with a readable reason and goes to the DLQ.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

SCHEMA_VERSION = 1

NonNegFloat = Annotated[float, Field(ge=0)]
NonNegInt = Annotated[int, Field(ge=0)]


def now_ms() -> float:
    """Wall-clock time in milliseconds since the epoch."""
    return time.time() * 1000.0


def new_request_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


class Message(BaseModel):
    """Base of every wire message: strict, closed, versioned."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False)

    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        """Serialize to UTF-8 JSON."""
        return self.model_dump_json().encode()


class SamplingParams(BaseModel):
    """SGLang-style sampling parameters."""

    model_config = ConfigDict(extra="forbid", strict=True)

    max_new_tokens: int = Field(128, ge=1, le=1_000_000)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list)
    ignore_eos: bool = False


# ---- streaming and engine APIs (issue 14): new, optional fields and messages; absent, nothing changes -------

MAX_MESSAGES = 1024  # chat messages in one request
MAX_CONTENT_PARTS = 256  # parts of one message's content
MAX_CHAT_CHARS = 1_000_000  # characters of every message's text together
MAX_LIST_ITEMS = 64  # stop token ids, stop patterns, token ids whose logprobs are asked for
MAX_PATTERN_CHARS = 1024  # one stop_regex pattern
MAX_TOKEN_ID = 2**31 - 1
MAX_N = 128  # choices per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_TOKENS = 1_000_000  # the same bound as SamplingParams.max_new_tokens
MAX_CHUNK_DATA_CHARS = 64 * 1024  # one StreamChunk's `text` or `data` fragment (a Kafka message stays < 1 MB)
MAX_SEQ = 10_000_000
ID_PATTERN = r"^[A-Za-z0-9._:/-]{1,128}$"

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]


class TextPart(BaseModel):
    """A text part of a chat message's content (OpenAI's `{"type": "text", "text": ...}`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"] = "text"
    text: str = Field(max_length=MAX_CHAT_CHARS)


class ChatMessage(BaseModel):
    """One message of a chat, as OpenAI's chat API takes it (text only: images, audio and tool calls are not
    carried)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, max_length=MAX_CHAT_CHARS)
    name: str | None = Field(None, max_length=256)

    @property
    def text(self) -> str:
        """The content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    @model_validator(mode="after")
    def _bounded_parts(self) -> ChatMessage:
        if isinstance(self.content, list) and len(self.content) > MAX_CONTENT_PARTS:
            raise ValueError(f"at most {MAX_CONTENT_PARTS} content parts")
        return self


def _bounded_chat(messages: list[ChatMessage] | None) -> list[ChatMessage] | None:
    if messages is None:
        return None
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"at most {MAX_MESSAGES} messages")
    if sum(len(m.text) for m in messages) > MAX_CHAT_CHARS:
        raise ValueError(f"the messages' text is longer than {MAX_CHAT_CHARS} characters")
    return messages


EngineApiKind = Literal["chat", "completions", "generate"]


class EngineApi(BaseModel):
    """How the worker calls its engine for a request that carries this: SGLang's OpenAI chat
    (`/v1/chat/completions`, for `messages`), completions (`/v1/completions`) or native `/generate` API, with
    these options beside `sampling`'s temperature, top_p, stop and ignore_eos. The engine's stream events go to
    the reply topic as StreamChunks (each event's JSON when `stream`; else one aggregated response body), and
    the InferenceResult carries the status, token counts and timings (its `text` is choice 0's)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    kind: EngineApiKind
    max_tokens: int | None = Field(None, ge=0, le=MAX_TOKENS, description=(
        "the engine's limit on generated tokens per choice (0: prefill only, `generate` alone); none: the "
        "engine's default for the API (chat: up to the context length). `sampling.max_new_tokens` is then the "
        "router's estimate only"))
    n: int = Field(1, ge=1, le=MAX_N)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    logprob_start_len: int = Field(-1, ge=-1, le=MAX_TOKENS)
    return_text_in_logprobs: bool = False
    token_ids_logprob: list[TokenId] | None = Field(None, max_length=MAX_LIST_ITEMS)
    frequency_penalty: FiniteFloat = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: FiniteFloat = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: FiniteFloat = Field(1.0, gt=0.0, le=2.0)
    top_k: int = Field(-1, ge=-1, le=MAX_TOKEN_ID)
    min_p: FiniteFloat = Field(0.0, ge=0.0, le=1.0)
    min_tokens: int = Field(0, ge=0, le=MAX_TOKENS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop_token_ids: list[TokenId] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    stop_regex: list[Annotated[str, Field(min_length=1, max_length=MAX_PATTERN_CHARS)]] = Field(
        default_factory=list, max_length=MAX_LIST_ITEMS)
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=256)

class InferenceRequest(Message):
    """A client's request, produced to `lodestar.requests`."""

    request_id: str = Field(default_factory=new_request_id, min_length=1, max_length=256)
    prompt: str | None = None
    input_ids: list[NonNegInt] | None = None
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    session_id: str | None = Field(None, max_length=256)
    reply_to: str | None = Field(None, max_length=249)
    priority: int = 0
    deadline_ms: float | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: float = Field(default_factory=now_ms)
    messages: Annotated[list[ChatMessage] | None, AfterValidator(_bounded_chat)] = Field(None, description=(
        "a chat instead of a prompt: served by the engine's chat API (which applies the model's chat template)"))
    api: EngineApi | None = Field(None, description="serve through this engine API (default: /generate, or chat "
                                                    "for `messages`)")
    stream: bool = Field(False, description="publish StreamChunks to the reply topic as the engine produces "
                                            "output, before the InferenceResult")

    @model_validator(mode="after")
    def _one_prompt(self) -> InferenceRequest:
        has_text = self.prompt is not None and self.prompt != ""
        has_ids = self.input_ids is not None and len(self.input_ids) > 0
        has_chat = self.messages is not None and len(self.messages) > 0
        if has_text + has_ids + has_chat != 1:
            raise ValueError("exactly one of a non-empty `prompt` or non-empty `input_ids` is required "
                             "(or non-empty `messages`)")
        if self.api is not None and (self.api.kind == "chat") != has_chat:
            raise ValueError("`api.kind` chat goes with `messages`, completions and generate with a prompt")
        if self.api is not None and self.api.max_tokens == 0 and self.api.kind != "generate":
            raise ValueError("`api.max_tokens` 0 (prefill only) is for `api.kind` generate")
        return self

    @property
    def engine_api(self) -> EngineApiKind:
        """The engine API this request is served by."""
        if self.api is not None:
            return self.api.kind
        return "chat" if self.messages else "generate"


class RoutingDecision(Message):
    """What a dispatcher decided for one request, and why."""

    worker_id: str = Field(min_length=1)
    policy: str
    model_version: int = Field(0, ge=0)
    features: dict[str, float] = Field(default_factory=dict)
    predicted_ttft_ms: float | None = None
    explored: bool = False
    matched_prefix_tokens: NonNegInt = 0
    dispatcher_id: str = ""
    decided_at: float = Field(default_factory=now_ms)
    attempt: NonNegInt = 0


class RoutedRequest(Message):
    """A request plus its routing decision, produced to `lodestar.worker.<id>`."""

    request: InferenceRequest
    decision: RoutingDecision


Status = Literal["ok", "error", "rejected"]


class InferenceResult(Message):
    """The one final result of a request, produced to the reply topic."""

    request_id: str
    worker_id: str
    status: Status
    text: str = ""
    prompt_tokens: NonNegInt = 0
    cached_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    ttft_ms: NonNegFloat | None = None
    tpot_ms: NonNegFloat | None = None
    e2e_ms: NonNegFloat | None = None
    finish_reason: str | None = None
    error: str | None = None
    completed_at: float = Field(default_factory=now_ms)
    error_status: int | None = Field(None, ge=100, le=599, description=(
        "the HTTP status that best describes a failed request: the engine's own answer when it refused or "
        "failed (400 refused input, 503 overloaded), 499 when the client aborted it"))


class StreamChunk(Message):
    """Output of a streaming request as it is produced, on the request's reply topic before its InferenceResult.

    One serving of the request (`serve_id`) numbers its chunks 0, 1, 2, ... (`seq`); the same partition
    (key: the request id) keeps them in order, followed by the result. A request served again after its worker
    died, or taken over, starts a new `serve_id` from 0: a consumer keeps one serving's chunks and drops
    repeats (`seq` already seen). Requests without `api` carry `text` (the text generated since the previous
    chunk); requests with `api` carry `data`: the engine's stream events as JSON texts, one per line (one
    event, or several that came while the worker waited for the broker to take the previous chunk), when
    `stream`; else the whole response body. `data` longer than the fragment limit is split across chunks
    (`more`: the next chunk continues it)."""

    kind: Literal["chunk"] = "chunk"
    request_id: str = Field(min_length=1, max_length=256)
    worker_id: str = Field(min_length=1, max_length=200)
    serve_id: str = Field(pattern=ID_PATTERN)
    seq: int = Field(ge=0, le=MAX_SEQ)
    text: str = Field("", max_length=MAX_CHUNK_DATA_CHARS)
    data: str = Field("", max_length=MAX_CHUNK_DATA_CHARS)
    more: bool = False
    completion_tokens: NonNegInt = 0
    sent_at: float = Field(default_factory=now_ms)


class TelemetryEvent(Message):
    """What a worker observed for one routed request; the learner's input."""

    request_id: str
    decision: RoutingDecision
    gpu_type: str
    status: Status
    ttft_ms: NonNegFloat | None = None
    tpot_ms: NonNegFloat | None = None
    e2e_ms: NonNegFloat | None = None
    queue_ms: NonNegFloat | None = None
    prompt_tokens: NonNegInt = 0
    cached_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    sent_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float = Field(default_factory=now_ms)


class DeadLetter(Message):
    """A message that could not be processed, with the reason. Nothing is dropped silently."""

    stage: str
    service: str
    reason: str
    topic: str = ""
    partition: int | None = None
    offset: int | None = None
    key: str | None = None
    payload: str = ""
    headers: dict[str, str] = Field(default_factory=dict)
    failed_at: float = Field(default_factory=now_ms)


class WorkerState(BaseModel):
    """A worker's registry entry and live state, stored as a Redis hash with a TTL."""

    model_config = ConfigDict(extra="ignore")

    worker_id: str
    gpu_type: str
    topic: str
    model: str = ""
    running: NonNegInt = 0
    waiting: NonNegInt = 0
    inflight: NonNegInt = 0
    pending_prefill_tokens: NonNegInt = 0
    kv_usage: float = Field(0.0, ge=0.0)
    max_kv_tokens: NonNegInt = 0
    recent_ttft_ms: NonNegFloat = 0.0
    draining: bool = False
    updated_at: float = Field(default_factory=now_ms)

    def to_redis(self) -> dict[str, str]:
        """Flatten to a Redis hash mapping."""
        return {k: (str(int(v)) if isinstance(v, bool) else str(v)) for k, v in self.model_dump().items()}

    @classmethod
    def from_redis(cls, mapping: dict[Any, Any]) -> WorkerState:
        """Parse a Redis hash (bytes or str keys and values)."""
        data = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in mapping.items()
        }
        if "draining" in data:
            data["draining"] = data["draining"] in ("1", "True", "true")
        return cls.model_validate(data)


M = TypeVar("M", bound=Message)


class InvalidMessage(ValueError):
    """Raised when bytes from Kafka are not a valid message; `reason` is human-readable."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def decode(model: type[M], raw: bytes | str) -> M:
    """Parse JSON bytes into `model`, raising InvalidMessage with a clear, one-line-per-error reason."""
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<message>"
            parts.append(f"{loc}: {err['msg']}")
        raise InvalidMessage(f"invalid {model.__name__}: " + "; ".join(parts)) from None
