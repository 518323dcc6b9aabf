"""The one failure classification: a record's own fault goes to the DLQ, the environment's is retried."""

from __future__ import annotations

import asyncio
import itertools

import pytest
from aiokafka import errors as kafka_errors
from pydantic import ValidationError
from redis import exceptions as redis_errors

from lodestar.faults import Backoff, Fault, TransientFailure, classify, describe, error_type, retry_transient
from lodestar.kafka_io import DeadLetterUnavailable
from lodestar.limits import OversizedMessage
from lodestar.schemas import InferenceRequest, InvalidMessage


def validation_error() -> ValidationError:
    try:
        InferenceRequest(prompt="x", request_id="no spaces")
    except ValidationError as exc:
        return exc
    raise AssertionError("the request validated")


@pytest.mark.parametrize(("exc", "fault"), [
    # the record's own: dead-letter it
    (OverflowError("Python int too large to convert to C unsigned long"), Fault.PERMANENT),
    (ValueError("bad"), Fault.PERMANENT),
    (KeyError("features missing"), Fault.PERMANENT),
    (TypeError("unhashable"), Fault.PERMANENT),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"), Fault.PERMANENT),
    (validation_error(), Fault.PERMANENT),
    (InvalidMessage("invalid InferenceRequest"), Fault.PERMANENT),
    (OversizedMessage("the routed request makes a record of 2000000 bytes"), Fault.PERMANENT),
    (kafka_errors.MessageSizeTooLargeError(), Fault.PERMANENT),
    (kafka_errors.RecordTooLargeError(), Fault.PERMANENT),
    (kafka_errors.InvalidTopicError(), Fault.PERMANENT),
    (kafka_errors.TopicAuthorizationFailedError("lodestar.reply.x"), Fault.PERMANENT),
    (kafka_errors.UnknownTopicOrPartitionError(), Fault.PERMANENT),
    (redis_errors.DataError("Invalid input of type: 'NoneType'"), Fault.PERMANENT),
    (redis_errors.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
     Fault.PERMANENT),
    # the environment's: hold the record and retry
    (kafka_errors.KafkaConnectionError(), Fault.TRANSIENT),
    (kafka_errors.KafkaTimeoutError(), Fault.TRANSIENT),
    (kafka_errors.RequestTimedOutError(), Fault.TRANSIENT),
    (kafka_errors.NotLeaderForPartitionError(), Fault.TRANSIENT),
    (kafka_errors.NodeNotReadyError(), Fault.TRANSIENT),
    (redis_errors.ConnectionError("Connection refused"), Fault.TRANSIENT),
    (redis_errors.TimeoutError("Timeout reading from socket"), Fault.TRANSIENT),
    (redis_errors.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'."), Fault.TRANSIENT),
    (redis_errors.ReadOnlyError("You can't write against a read only replica."), Fault.TRANSIENT),
    (redis_errors.BusyLoadingError("Redis is loading the dataset in memory"), Fault.TRANSIENT),
    (ConnectionRefusedError(111, "Connection refused"), Fault.TRANSIENT),
    (TimeoutError(), Fault.TRANSIENT),
    (TransientFailure("no routable worker"), Fault.TRANSIENT),
    (DeadLetterUnavailable("the dead-letter topic did not take 1 letters"), Fault.TRANSIENT),
], ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else v.value)
def test_classification(exc: BaseException, fault: Fault) -> None:
    assert classify(exc) is fault


def test_a_reason_is_one_bounded_line_and_the_type_is_qualified() -> None:
    exc = ValueError("line one\nline two " + "x" * 5000)
    text = describe(exc, 100)
    assert text.startswith("ValueError: line one line two") and len(text) == 100 and "\n" not in text
    assert describe(TimeoutError()) == "TimeoutError()"
    assert error_type(OverflowError()) == "OverflowError"
    assert error_type(kafka_errors.MessageSizeTooLargeError()) == "aiokafka.errors.MessageSizeTooLargeError"


def test_backoff_doubles_up_to_its_cap_with_jitter_below_each_step() -> None:
    delays = list(itertools.islice(Backoff(0.1, max_s=1.0, jitter=0.2).delays(), 8))
    steps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(0.8 * step <= d <= step for d, step in zip(delays, steps, strict=True))
    assert list(itertools.islice(Backoff(0.5, max_s=2.0, jitter=0.0).delays(), 4)) == [0.5, 1.0, 2.0, 2.0]


async def test_retry_transient_retries_the_environment_and_raises_the_record_at_once() -> None:
    calls: list[str] = []

    async def flaky() -> str:
        calls.append("try")
        if len(calls) < 3:
            raise kafka_errors.KafkaConnectionError()
        return "ok"

    assert await retry_transient(flaky, what="test", backoff=Backoff(0.001)) == "ok"
    assert len(calls) == 3

    async def poison() -> None:
        calls.append("poison")
        raise kafka_errors.MessageSizeTooLargeError()

    with pytest.raises(kafka_errors.MessageSizeTooLargeError):
        await asyncio.wait_for(retry_transient(poison, what="test", backoff=Backoff(0.001)), 5)
    assert calls.count("poison") == 1


async def test_retry_transient_gives_up_on_what_the_caller_can_do_without() -> None:
    calls = 0

    async def oom() -> None:
        nonlocal calls
        calls += 1
        raise redis_errors.OutOfMemoryError("OOM command not allowed")

    with pytest.raises(redis_errors.OutOfMemoryError):
        await retry_transient(oom, what="store", backoff=Backoff(0.001),
                              give_up=lambda e: isinstance(e, redis_errors.OutOfMemoryError))
    assert calls == 1
