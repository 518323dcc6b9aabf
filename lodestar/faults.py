"""What a failure means, for every service: the record's own fault, or the environment's.

A failure while handling one consumed record is one of two kinds (`classify`):

- **permanent**: the record itself cannot be processed, now or ever: it does not validate, it overflows
  something, its result is too large for the broker, its reply topic is refused or does not exist, or
  the code has a bug it triggers. Retrying changes nothing, so the record goes to the dead-letter topic
  with the reason and the exception's type, and its partition moves on.
- **transient**: the environment failed (the broker or Redis unreachable or timing out, a rebalance,
  no routable worker right now). The record is fine: it stays uncommitted and is tried again after a
  backoff (`Backoff`, `retry_transient`) until the environment heals.

The rule is by exclusion: Kafka, Redis and OS errors are transient unless they are one of the errors
that name the record (`PERMANENT_ERRORS`: its size, its topic, its authorization, a Redis argument or
reply error such as WRONGTYPE on its key); a Redis reply that describes the server's state (out of
memory, read-only replica, an ACL refusal, loading) stays transient. Anything else (a ValueError, an
OverflowError, a pydantic ValidationError, a KeyError from a bug) is the record's. So a poison record can never halt a
partition, and an outage never sends good records to the DLQ.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import TypeVar

from aiokafka import errors as kafka_errors
from redis import exceptions as redis_errors

log = logging.getLogger(__name__)

T = TypeVar("T")

# Kafka errors about one record or its destination, not about the cluster: retrying cannot help.
PERMANENT_KAFKA_ERRORS: tuple[type[BaseException], ...] = (
    kafka_errors.MessageSizeTooLargeError,  # larger than the producer's max_request_size or message.max.bytes
    kafka_errors.RecordTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.InvalidTopicError,  # an illegal name, or an internal topic (`__consumer_offsets`)
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.UnknownTopicOrPartitionError,  # still unknown after the producer's metadata wait
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidTimestampError,
    kafka_errors.PolicyViolationError,
)
# Redis replies that describe the server's state, not the command: worth waiting out.
REDIS_STATE_REPLIES: tuple[type[BaseException], ...] = (
    redis_errors.OutOfMemoryError, redis_errors.ReadOnlyError, redis_errors.NoPermissionError,
    redis_errors.TryAgainError, redis_errors.ClusterDownError, redis_errors.ExecAbortError,
)
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    *PERMANENT_KAFKA_ERRORS, redis_errors.DataError, redis_errors.ResponseError,
)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (kafka_errors.KafkaError, redis_errors.RedisError, OSError)


class Fault(Enum):
    """Whose fault a failure is."""

    TRANSIENT = "transient"  # the environment's: hold the record uncommitted, back off, try again
    PERMANENT = "permanent"  # the record's: dead-letter it with the reason, move on


class TransientFailure(Exception):
    """A failure of the environment that Lodestar's own code detects (e.g. no routable worker right now)."""


def classify(exc: BaseException) -> Fault:
    """Whether `exc`, raised while handling one record, is the record's fault or the environment's."""
    if isinstance(exc, (TransientFailure, *REDIS_STATE_REPLIES)):
        return Fault.TRANSIENT
    if isinstance(exc, PERMANENT_ERRORS):
        return Fault.PERMANENT
    if isinstance(exc, TRANSIENT_ERRORS):
        return Fault.TRANSIENT
    return Fault.PERMANENT


def is_transient(exc: BaseException) -> bool:
    """Shorthand for `classify(exc) is Fault.TRANSIENT`."""
    return classify(exc) is Fault.TRANSIENT


def is_redis_oom(exc: BaseException) -> bool:
    """Redis refused a write because it reached `maxmemory` (policy `noeviction`, or nothing evictable)."""
    return isinstance(exc, redis_errors.OutOfMemoryError)


def describe(exc: BaseException, limit: int = 2000) -> str:
    """`Type: message`, one readable line of at most `limit` characters, for a dead letter's reason."""
    text = str(exc) or repr(exc)
    name = type(exc).__name__
    line = " ".join((text if text.startswith(name) else f"{name}: {text}").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def error_type(exc: BaseException) -> str:
    """The exception's qualified type name, e.g. `aiokafka.errors.MessageSizeTooLargeError`."""
    cls = type(exc)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with jitter: `first_s`, doubling up to `max_s`, each delay scaled by a random
    factor in [1 - jitter, 1] so that many clients recovering together do not retry in step."""

    first_s: float
    max_s: float = 5.0
    jitter: float = 0.2

    def delays(self) -> Iterator[float]:
        """The pause before each retry, without end."""
        delay = self.first_s
        while True:
            yield delay * (1.0 - self.jitter * random.random())
            delay = min(delay * 2.0, self.max_s)


async def retry_transient(action: Callable[[], Awaitable[T]], *, what: str, backoff: Backoff,
                          give_up: Callable[[Exception], bool] | None = None) -> T:
    """Run `action` until it succeeds: a transient failure is logged and retried after the next backoff
    delay (for ever: cancel the caller to stop); a permanent one, or one `give_up` names (e.g. a Redis out
    of memory on a write the caller can do without), is raised at once."""
    delays = backoff.delays()
    while True:
        try:
            return await action()
        except Exception as exc:
            if not is_transient(exc) or (give_up is not None and give_up(exc)):
                raise
            delay = next(delays)
            log.warning("could not %s (%s); retrying in %.2f s", what, describe(exc, 300), delay)
            await asyncio.sleep(delay)
