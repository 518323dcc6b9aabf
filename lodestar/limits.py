"""The deployment's bounds on input, checked on top of the wire contract's fixed ones (lodestar/schemas.py).

`Limits` (built from settings.limits) is what the dispatcher and the worker apply to every request:

- **total size**, on the raw bytes before anything is parsed: a request may be at most
  `max_message_bytes - ROUTED_RESERVE_BYTES`, so that its routed copy (the request re-serialized, plus the
  routing decision, plus the propagated trace headers) always fits the producer's and the broker's limit
  (the arithmetic is at `ROUTED_RESERVE_BYTES`). Anything Lodestar produces is checked again before it is
  sent (`check_size`);
- **token ids** at most `max_token_id` (the model's vocabulary);
- **deadline_ms**, an absolute time (epoch ms): a request past it is answered, not served
  (`deadline_passed`);
- **reply_to** only to an allowed topic (`ReplyTopics`): a match of `reply_to_pattern`, and never Kafka's
  internal `__*` topics nor Lodestar's own requests, worker, telemetry or DLQ topics, whatever the pattern.

Each check raises InvalidMessage with a readable reason (the dead letter's).
"""

from __future__ import annotations

import re

from lodestar.kafka_io import Headers
from lodestar.names import Topics
from lodestar.schemas import InferenceRequest, InvalidMessage, M, decode
from lodestar.settings import Settings

# What a routed copy adds to the request it carries, at most (bytes; tests/unit/test_limits.py builds the worst
# case and checks it with aiokafka's own size estimate):
#   the RoutedRequest envelope and the RoutingDecision: <= 8 KiB (64 features of <= 64-character names and
#     finite numbers, a worker id <= 200, a policy name <= 64, a dispatcher id <= 256 characters, an origin;
#     the worst case measures 6.7 KB);
#   the request re-serialized (defaults filled in, numbers in canonical form) versus as received: <= 1 KiB
#     (JSON whitespace and escapes only shrink; the fixed set of optional fields and numbers adds ~0.3 KB);
#   the trace headers: <= 8.3 KiB (the span's traceparent, 55 bytes, and the tracestate it inherits, which
#     OpenTelemetry's W3C propagator caps at 8,192 characters; incoming baggage is not carried on);
#   the record key (a request id, <= 128 bytes) and Kafka's record and batch framing: < 1 KiB.
# About 18 KiB in all; the reserve rounds it up to 64 KiB, so a request of up to max_message_bytes - 64 KiB
# (983,040 bytes by default) is always routable.
ROUTED_RESERVE_BYTES = 64 * 1024
RECORD_FRAMING_BYTES = 512  # Kafka's record batch header (61 bytes) and record framing, generously


def deadline_passed(request: InferenceRequest, now_ms: float) -> str | None:
    """Why `request` is not to be served any more (its `deadline_ms`, epoch ms, is past), or None."""
    if request.deadline_ms is None or request.deadline_ms > now_ms:
        return None
    return (f"deadline exceeded: deadline_ms {request.deadline_ms:.0f} passed "
            f"{now_ms - request.deadline_ms:.0f} ms ago")


class OversizedMessage(InvalidMessage):
    """A message Lodestar would produce is larger than the broker takes."""


class ReplyTopics:
    """Which topics a request may name as its `reply_to`."""

    def __init__(self, topics: Topics, pattern: str):
        self._topics = topics
        self._pattern = re.compile(pattern.replace("{prefix}", re.escape(topics.prefix)))
        self._own = {topics.requests, topics.telemetry, topics.dlq}

    def refusal(self, topic: str) -> str | None:
        """Why `topic` may not be a reply topic, or None if it may."""
        if topic.startswith("__"):
            return f"reply_to {topic!r} is a Kafka internal topic"
        if topic in self._own or topic.startswith(f"{self._topics.prefix}worker."):
            return f"reply_to {topic!r} is a Lodestar system topic"
        if not self._pattern.fullmatch(topic):
            return f"reply_to {topic!r} is not an allowed reply topic (limits.reply_to_pattern)"
        return None


class Limits:
    """The deployment's input bounds (settings.limits) and the reply-topic allowlist."""

    def __init__(self, settings: Settings):
        cfg = settings.limits
        self.topics = Topics(settings.kafka.topic_prefix)
        self.max_message_bytes = cfg.max_message_bytes
        self.max_request_bytes = cfg.max_message_bytes - ROUTED_RESERVE_BYTES
        self.max_token_id = cfg.max_token_id
        self.reply_topics = ReplyTopics(self.topics, cfg.reply_to_pattern)

    def check_raw(self, raw: bytes | bytearray | None, limit: int, what: str) -> bytes:
        """The raw bytes of a consumed message, refused before parsing if absent or over `limit`."""
        if raw is None or len(raw) == 0:
            raise InvalidMessage("empty message (no value)")
        if len(raw) > limit:
            raise InvalidMessage(f"invalid {what}: {len(raw)} bytes, over the {limit}-byte limit")
        return bytes(raw)

    def decode_request(self, raw: bytes | bytearray | None) -> InferenceRequest:
        """Check the size, decode and check one client request (the dispatcher's admission)."""
        request = decode(InferenceRequest, self.check_raw(raw, self.max_request_bytes, "InferenceRequest"))
        self.check_request(request)
        return request

    def decode(self, model: type[M], raw: bytes | bytearray | None) -> M:
        """Check the size and decode any message Lodestar produced (routed requests, telemetry)."""
        return decode(model, self.check_raw(raw, self.max_message_bytes, model.__name__))

    def check_request(self, request: InferenceRequest) -> None:
        """The checks a valid InferenceRequest must also pass here: token ids in range, reply topic allowed."""
        if request.input_ids:
            top = max(request.input_ids)
            if top > self.max_token_id:
                raise InvalidMessage(f"invalid InferenceRequest: input_ids holds token id {top}, beyond "
                                     f"limits.max_token_id={self.max_token_id} (the model's vocabulary)")
        if request.reply_to is not None:
            refusal = self.reply_topics.refusal(request.reply_to)
            if refusal is not None:
                raise InvalidMessage(f"invalid InferenceRequest: {refusal}")

    def reply_topic(self, request: InferenceRequest) -> str:
        """Where `request`'s result goes: its reply_to once allowed (InvalidMessage if not), else results."""
        self.check_request(request)
        return request.reply_to or self.topics.results

    def check_size(self, payload: bytes, what: str, *, key: bytes | None = None,
                   headers: Headers | None = None) -> bytes:
        """`payload` if the record it makes (with `key` and `headers`) fits, else OversizedMessage (a
        permanent, per-record failure)."""
        size = len(payload) + len(key or b"") + sum(len(k) + len(v) for k, v in headers or ()) + RECORD_FRAMING_BYTES
        if size > self.max_message_bytes:
            raise OversizedMessage(f"{what} makes a record of {size} bytes, over limits.max_message_bytes="
                                   f"{self.max_message_bytes}")
        return payload
