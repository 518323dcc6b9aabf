"""Dead letters carry the reason and the exception's type, always fit the broker's message size (the payload
cut with a marker and its original size), and a DLQ that refuses one is a transient failure."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError

from lodestar.faults import is_transient
from lodestar.kafka_io import (
    DEAD_LETTER_FRAMING_BYTES,
    DeadLetters,
    DeadLetterUnavailable,
    dead_letter_for,
    fit_dead_letter,
)
from lodestar.names import Topics
from lodestar.schemas import DeadLetter, decode

MAX = 262_144


def record(value: bytes | None, key: bytes | None = b"k", headers: list[tuple[str, bytes]] | None = None
           ) -> ConsumerRecord:
    return ConsumerRecord(topic="lodestar.requests", partition=3, offset=17, timestamp=0, timestamp_type=0,
                          key=key, value=value, checksum=None, serialized_key_size=0,
                          serialized_value_size=len(value or b""), headers=headers or [])


def test_a_letter_names_the_failure_and_its_type() -> None:
    letter = dead_letter_for(record(b'{"input_ids":[4294967296]}'), stage="route", service="dispatcher",
                             failure=OverflowError("Python int too large to convert to C long"))
    assert letter.reason == "Python int too large to convert to C long" and letter.error_type == "OverflowError"
    assert (letter.topic, letter.partition, letter.offset, letter.key) == ("lodestar.requests", 3, 17, "k")
    assert letter.payload == '{"input_ids":[4294967296]}' and letter.payload_bytes == 26
    assert not letter.payload_truncated
    assert fit_dead_letter(letter, MAX) == letter.to_bytes()  # small: untouched
    plain = dead_letter_for(record(None), stage="validate", service="learner", failure="empty message")
    assert plain.error_type == "" and plain.payload == "" and plain.payload_bytes == 0


@pytest.mark.parametrize("unit", ["a", "é", "\x01", '"', "\U0001f600", "\ufffd"])
def test_a_payload_too_large_is_cut_to_fit_with_a_marker(unit: str) -> None:
    """Whatever the payload's characters cost once escaped in JSON (1 to 12 bytes), the letter fits."""
    raw = (unit * 600_000).encode()
    letter = dead_letter_for(record(raw, key=b"x" * 5000, headers=[("h" * 300, b"v" * 5000)] * 1 +
                                    [(f"h{i}", b"v") for i in range(100)]),
                             stage="validate", service="dispatcher", failure=ValueError("too big " * 2000))
    data = fit_dead_letter(letter, MAX)
    assert len(data) <= MAX - DEAD_LETTER_FRAMING_BYTES - len((letter.key or "").encode())
    back = decode(DeadLetter, data)
    assert back.payload_truncated and back.payload_bytes == len(raw)
    assert back.payload.endswith(f"…[truncated by lodestar: {len(raw)} bytes]")
    assert back.payload.startswith(unit * 10)
    assert len(back.payload) > 1000  # cut to what fits, not emptied
    assert len(back.key or "") <= 256 and len(back.headers) <= 64 and len(back.reason) <= 4096
    assert all(len(k) <= 256 and len(v) <= 1024 for k, v in back.headers.items())


class Producer:
    """Acknowledges, or fails the way it is told, each send to the DLQ."""

    def __init__(self, failure: Exception | None = None, on_ack: bool = False):
        self.failure, self.on_ack = failure, on_ack
        self.sent: list[tuple[str, bytes, bytes | None]] = []

    async def send(self, topic: str, value: bytes, key: bytes | None = None) -> asyncio.Future[None]:
        if self.failure is not None and not self.on_ack:
            raise self.failure
        self.sent.append((topic, value, key))
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.failure is not None:
            ack.set_exception(self.failure)
        else:
            ack.set_result(None)
        return ack


async def test_letters_go_to_the_dlq_fitted() -> None:
    producer = Producer()
    letters = DeadLetters(producer, Topics("t1."), "dispatcher", MAX)  # type: ignore[arg-type]
    big = letters.letter(record(b"z" * 1_000_000), "validate", "too large")
    await letters.send([big, letters.letter(record(b"{}", key=None), "validate", "no prompt")])
    assert [(t, k) for t, _, k in producer.sent] == [("t1.dlq", b"k"), ("t1.dlq", None)]
    assert len(producer.sent[0][1]) < MAX and json.loads(producer.sent[0][1])["payload_truncated"]


@pytest.mark.parametrize("producer", [Producer(KafkaConnectionError()), Producer(KafkaConnectionError(), on_ack=True),
                                      Producer(TopicAuthorizationFailedError("t1.dlq"), on_ack=True)],
                         ids=["send", "ack", "permanent-on-the-dlq"])
async def test_a_dlq_that_refuses_a_letter_is_transient_whatever_the_cause(producer: Producer) -> None:
    letters = DeadLetters(producer, Topics("t1."), "worker", MAX)  # type: ignore[arg-type]
    with pytest.raises(DeadLetterUnavailable) as info:
        await letters.send([letters.letter(record(b"x"), "decode", "bad")])
    assert is_transient(info.value)
