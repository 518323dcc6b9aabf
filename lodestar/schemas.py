"""Message contracts between services (docs/architecture.md "Contracts"), JSON on the wire.

Every message carries `schema_version`; validation is strict (unknown fields are rejected, types are
not coerced from strings) so that bad input fails loudly with a readable reason and goes to the DLQ.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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

    @model_validator(mode="after")
    def _one_prompt(self) -> InferenceRequest:
        has_text = self.prompt is not None and self.prompt != ""
        has_ids = self.input_ids is not None and len(self.input_ids) > 0
        if has_text == has_ids:
            raise ValueError("exactly one of a non-empty `prompt` or non-empty `input_ids` is required")
        return self


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
