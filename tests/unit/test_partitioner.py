"""The producers' partitioner: aiokafka's by-key choice, with a topic of one partition short-circuited."""

from __future__ import annotations

import uuid

import pytest
from aiokafka.partitioner import DefaultPartitioner

from lodestar import kafka_io
from lodestar.kafka_io import partition_by_key
from lodestar.settings import Settings


def test_same_partition_as_aiokafkas_default_for_every_key() -> None:
    default = DefaultPartitioner()
    for n in (2, 3, 12):
        parts = list(range(n))
        for _ in range(200):
            key = uuid.uuid4().hex.encode()
            assert partition_by_key(key, parts, parts) == default(key, parts, parts)


def test_one_partition_is_chosen_without_hashing_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_hashing(*_: object) -> int:
        raise AssertionError("the key was hashed")

    monkeypatch.setattr(kafka_io, "_BY_KEY", no_hashing)
    assert partition_by_key(b"any-key", [0], [0]) == 0
    assert partition_by_key(None, [3], []) == 3
    with pytest.raises(AssertionError):
        partition_by_key(b"k", [0, 1], [0, 1])


async def test_producers_use_it() -> None:
    producer = kafka_io.make_producer(Settings(), client_id="t")  # not started: no connection is made
    assert producer._partitioner is partition_by_key  # noqa: SLF001 - the option as aiokafka keeps it
