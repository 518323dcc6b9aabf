"""Message contracts between services (docs/architecture.md "Contracts"), JSON on the wire.

Every message carries `schema_version`; validation is strict (unknown fields are rejected, types are
not coerced from strings, numbers are finite: no NaN or Infinity) so that bad input fails loudly with a
readable reason and goes to the DLQ. Every field coming from outside is bounded here (lengths, counts,
ranges, character sets): these are the wire contract, the same for every deployment. Bounds that depend
on the deployment (the model's largest token id, the broker's message size, the allowed reply topics)
are checked on top of these by lodestar/limits.py.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from lodestar.names import WORKER_ID_PATTERN

SCHEMA_VERSION = 1

# Static bounds of the wire contract (docs/architecture.md "Contracts" lists them with their reasons).
MAX_TOKEN_ID = 2**31 - 1  # token ids are int32 on every engine; the model's own bound is limits.max_token_id
MAX_INPUT_IDS = 262_144  # tokens in `input_ids` (twice the longest common context, 128k)
MAX_PROMPT_CHARS = 1_000_000  # characters in `prompt` (the message size limit binds first for most text)
MAX_NEW_TOKENS = 1_000_000
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string
MAX_METADATA = 32  # metadata entries per request
MAX_METADATA_KEY_CHARS = 64
MAX_METADATA_VALUE_CHARS = 1024
ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"  # request and session ids: safe in Kafka keys, Redis keys and logs
TOPIC_PATTERN = r"^[A-Za-z0-9._-]{1,249}$"  # Kafka's topic name syntax
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1
EPOCH_MS_MAX = 4_102_444_800_000.0  # 2100-01-01T00:00:00Z in epoch milliseconds: no later time is sane
MAX_LATENCY_MS = 86_400_000.0  # one day: latencies beyond it are nonsense
MAX_FEATURES = 64  # named features in a routing decision
MAX_NAME_CHARS = 64  # policy, feature, GPU type, finish reason, stage and service names
MAX_REASON_CHARS = 4096  # error and dead-letter reasons
MAX_HEADERS = 64  # Kafka headers kept in a dead letter

NonNegFloat = Annotated[float, Field(ge=0)]
NonNegInt = Annotated[int, Field(ge=0)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]
Latency = Annotated[float, Field(ge=0, le=MAX_LATENCY_MS)]
EpochMs = Annotated[float, Field(ge=0, le=EPOCH_MS_MAX)]
TokenId = Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]
Name = Annotated[str, Field(max_length=MAX_NAME_CHARS)]
Reason = Annotated[str, Field(max_length=MAX_REASON_CHARS)]


def now_ms() -> float:
    """Wall-clock time in milliseconds since the epoch."""
    return time.time() * 1000.0


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters (ending with an ellipsis when cut), for a bounded field."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def new_request_id() -> str:
    """A fresh request id."""
    return uuid.uuid4().hex


class Message(BaseModel):
    """Base of every wire message: strict, closed, versioned."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=False, allow_inf_nan=False)

    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        """Serialize to UTF-8 JSON."""
        return self.model_dump_json().encode()


class SamplingParams(BaseModel):
    """SGLang-style sampling parameters."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]] = Field(
        default_factory=list, max_length=MAX_STOP)
    ignore_eos: bool = False


# ---- streaming and engine APIs (issue 14): new, optional fields and messages; absent, nothing changes -------

MAX_MESSAGES = 1024  # chat messages in one request
MAX_CONTENT_PARTS = 256  # parts of one message's content
MAX_CHAT_CHARS = MAX_PROMPT_CHARS  # characters of every message's text together, as a prompt
MAX_LIST_ITEMS = 64  # stop token ids, stop patterns, token ids whose logprobs are asked for
MAX_PATTERN_CHARS = 1024  # one stop_regex pattern
MAX_N = 128  # choices per request (OpenAI's limit)
MAX_TOP_LOGPROBS = 20  # alternatives per token (OpenAI's limit)
MAX_TOKENS = MAX_NEW_TOKENS  # the engine API's max_tokens and min_tokens, as sampling.max_new_tokens
MAX_SALT_CHARS = 256  # a cache_salt
MAX_CHUNK_DATA_CHARS = 64 * 1024  # one StreamChunk's `text` or `data` fragment (even all \u-escaped, < 400 KB)
MAX_SEQ = 10_000_000  # chunks of one serving

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]  # for models outside Message (the gateway's bodies)


class TextPart(BaseModel):
    """A text part of a chat message's content (OpenAI's `{"type": "text", "text": ...}`)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    type: Literal["text"]  # required: a default would grow the message when re-serialized (lodestar/limits.py)
    text: str = Field(max_length=MAX_CHAT_CHARS)


class ChatMessage(BaseModel):
    """One message of a chat, as OpenAI's chat API takes it (text only: images, audio and tool calls are not
    carried)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(None, max_length=MAX_CHAT_CHARS)
    name: Name | None = None

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

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

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
    cache_salt: str | None = Field(None, min_length=1, max_length=MAX_SALT_CHARS)

class InferenceRequest(Message):
    """A client's request, produced to `lodestar.requests`.

    `deadline_ms` is an absolute time (epoch milliseconds, the clock of `created_at`): a request still
    unserved then is answered with an `error` result instead of being generated. `priority` is passed to
    the engine as SGLang's `priority` (used when SGLang runs with `--enable-priority-scheduling`; absent:
    the engine's default).
    """

    request_id: Identifier = Field(default_factory=new_request_id)
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    input_ids: list[TokenId] | None = Field(None, max_length=MAX_INPUT_IDS)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    session_id: Identifier | None = None
    reply_to: str | None = Field(None, pattern=TOPIC_PATTERN)
    priority: int | None = Field(None, ge=PRIORITY_MIN, le=PRIORITY_MAX)
    deadline_ms: EpochMs | None = None
    metadata: dict[Annotated[str, Field(min_length=1, max_length=MAX_METADATA_KEY_CHARS)],
                   Annotated[str, Field(max_length=MAX_METADATA_VALUE_CHARS)]] = Field(
        default_factory=dict, max_length=MAX_METADATA)
    created_at: EpochMs = Field(default_factory=now_ms)
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

    worker_id: str = Field(pattern=WORKER_ID_PATTERN.pattern)
    policy: Name
    model_version: int = Field(0, ge=0, le=2**63 - 1)
    features: dict[Name, float] = Field(default_factory=dict, max_length=MAX_FEATURES)
    predicted_ttft_ms: float | None = None
    explored: bool = False
    matched_prefix_tokens: Count = 0
    dispatcher_id: str = Field("", max_length=256)
    decided_at: EpochMs = Field(default_factory=now_ms)
    attempt: int = Field(0, ge=0, le=10_000)


class RoutedRequest(Message):
    """A request plus its routing decision, produced to `lodestar.worker.<id>`.

    `origin` names the request's record on the requests topic (`<partition>@<offset>`), the same in every
    copy routed from it (re-routes included): a worker tells one more delivery of an answered request (same
    origin: skipped) from a new use of its request id (another origin: replayed, or refused).
    """

    request: InferenceRequest
    decision: RoutingDecision
    origin: str = Field("", pattern=r"^([0-9]{1,10}@[0-9]{1,20})?$")


Status = Literal["ok", "error", "rejected"]


class InferenceResult(Message):
    """The one final result of a request, produced to the reply topic."""

    request_id: Identifier
    worker_id: str = Field(max_length=200)  # empty when a dispatcher answered
    status: Status
    text: str = ""  # bounded by limits.max_message_bytes: a longer answer is an `error` result
    prompt_tokens: Count = 0
    cached_tokens: Count = 0
    completion_tokens: Count = 0
    ttft_ms: Latency | None = None
    tpot_ms: Latency | None = None
    e2e_ms: Latency | None = None
    finish_reason: Name | None = None
    error: Reason | None = None
    replayed: bool = False  # a stored result sent again for a request id seen before (docs/architecture.md)
    completed_at: EpochMs = Field(default_factory=now_ms)
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
    request_id: Identifier
    worker_id: str = Field(pattern=WORKER_ID_PATTERN.pattern)
    serve_id: Identifier
    seq: int = Field(ge=0, le=MAX_SEQ)
    text: str = Field("", max_length=MAX_CHUNK_DATA_CHARS)
    data: str = Field("", max_length=MAX_CHUNK_DATA_CHARS)
    more: bool = False
    completion_tokens: Count = 0
    sent_at: EpochMs = Field(default_factory=now_ms)


class TelemetryEvent(Message):
    """What a worker observed for one routed request; the learner's input."""

    request_id: Identifier
    decision: RoutingDecision
    gpu_type: Name
    status: Status
    ttft_ms: Latency | None = None
    tpot_ms: Latency | None = None
    e2e_ms: Latency | None = None
    queue_ms: Latency | None = None
    prompt_tokens: Count = 0
    cached_tokens: Count = 0
    completion_tokens: Count = 0
    sent_at: EpochMs = 0.0
    first_token_at: EpochMs | None = None
    finished_at: EpochMs = Field(default_factory=now_ms)


class DeadLetter(Message):
    """A message that could not be processed, with the reason. Nothing is dropped silently.

    The whole letter fits the broker's message size (lodestar.kafka_io.DeadLetters fits it): a payload
    too long for it is cut, ends with a marker, and `payload_truncated` and `payload_bytes` (the original
    size) say so.
    """

    stage: Name
    service: Name
    reason: Reason
    error_type: str = Field("", max_length=256)  # the exception's type, when an exception was the cause
    topic: str = Field("", max_length=249)
    partition: int | None = None
    offset: int | None = None
    key: str | None = Field(None, max_length=1024)
    payload: str = ""
    payload_bytes: Count = 0
    payload_truncated: bool = False
    headers: dict[str, str] = Field(default_factory=dict, max_length=MAX_HEADERS)
    failed_at: EpochMs = Field(default_factory=now_ms)


class WorkerState(BaseModel):
    """A worker's registry entry and live state, stored as a Redis hash with a TTL."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

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
    recent_output_tokens: NonNegFloat = 0.0  # smoothed completion tokens of its finished requests (0: none yet)
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
