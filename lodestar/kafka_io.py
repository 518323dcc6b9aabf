"""Kafka producers, consumers, admin clients and the dead-letter path, configured one way for every service.

Every Kafka client in the project is made here, so the broker address and its security (TLS, SASL; the
`kafka` settings section) reach every producer, consumer and admin call alike.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.partitioner import DefaultPartitioner

from lodestar.faults import TransientFailure, describe, error_type
from lodestar.names import Topics
from lodestar.schemas import MAX_HEADERS, MAX_REASON_CHARS, DeadLetter, clip
from lodestar.settings import ConfigurationError, KafkaSettings, Settings

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]

DEAD_LETTER_KEY_CHARS = 256  # a dead letter's key (the failed record's, cut): Kafka keys are unbounded
DEAD_LETTER_HEADER_CHARS = 1024  # each header value kept in a dead letter, cut to this
DEAD_LETTER_FRAMING_BYTES = 512  # record framing left out of a dead letter's size budget

# aiokafka keeps one produce request in flight per broker and waits for a partition's batch to drain once it
# is full: messages sent meanwhile collect in the next request, so batching happens without a linger (a 1 ms
# linger cost ~2 ms per hop on loopback: p50 3.5 vs 1.5 ms, docs/gateway.md), and a batch larger than the
# default 16 KiB keeps a stream's chunks from queueing behind a full one while a slow request is out.
MAX_BATCH_BYTES = 512 * 1024

_BY_KEY = DefaultPartitioner()


def partition_by_key(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner (murmur2 of the key, as the Java client's), except that a topic of one
    partition gets it without hashing the key: aiokafka's murmur2 is pure Python, ~10 us per record, paid by
    the dispatcher for every routed request though a worker topic has one partition by default."""
    if len(all_partitions) == 1:
        return all_partitions[0]
    return _BY_KEY(key, all_partitions, available)


def tls_context(kafka: KafkaSettings) -> ssl.SSLContext:
    """The TLS context of `SSL`/`SASL_SSL` connections: the broker verified against the configured CA (or the
    system's) and, with ssl_check_hostname, its name; a client certificate if one is configured."""
    try:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                             cafile=str(kafka.ssl_cafile) if kafka.ssl_cafile else None)
        context.check_hostname = kafka.ssl_check_hostname
        if kafka.ssl_certfile is not None:
            context.load_cert_chain(kafka.ssl_certfile, kafka.ssl_keyfile,
                                    kafka.ssl_key_password.get_secret_value() or None)
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(f"{name} {path}" for name, path in (("ssl_cafile", kafka.ssl_cafile),
                                                              ("ssl_certfile", kafka.ssl_certfile),
                                                              ("ssl_keyfile", kafka.ssl_keyfile)) if path)
        raise ConfigurationError(f"kafka TLS settings unusable ({files or 'system CAs'}): {exc}") from exc
    return context


def connection_options(kafka: KafkaSettings) -> dict[str, Any]:
    """What every Kafka client needs to reach and log in to the broker: its address and security."""
    options: dict[str, Any] = {"bootstrap_servers": kafka.bootstrap_servers,
                               "security_protocol": kafka.security_protocol}
    if kafka.uses_tls:
        options["ssl_context"] = tls_context(kafka)
    if kafka.uses_sasl:
        options.update(sasl_mechanism=kafka.sasl_mechanism, sasl_plain_username=kafka.sasl_username,
                       sasl_plain_password=kafka.sasl_password.get_secret_value())
    return options


def make_producer(settings: Settings, client_id: str, **options: Any) -> AIOKafkaProducer:
    """An idempotent producer (acks=all): a retried send is never duplicated in the log.

    `options` (aiokafka producer arguments) replace these defaults; the connection is always the settings'."""
    defaults: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 0,
                                "max_batch_size": MAX_BATCH_BYTES, "compression_type": None,
                                "partitioner": partition_by_key,
                                "max_request_size": settings.limits.max_message_bytes}
    return AIOKafkaProducer(client_id=client_id, **{**defaults, **options}, **connection_options(settings.kafka))


def make_consumer(
    settings: Settings, *topics: str, group_id: str | None, client_id: str, max_poll_records: int = 500,
    **options: Any,
) -> AIOKafkaConsumer:
    """A consumer with manual commits: offsets are committed only after the work is acknowledged.

    `options` (aiokafka consumer arguments) replace these defaults; the connection is always the settings'."""
    defaults: dict[str, Any] = {
        "enable_auto_commit": False, "auto_offset_reset": "earliest", "session_timeout_ms": 10_000,
        "heartbeat_interval_ms": 1_000, "metadata_max_age_ms": 5_000,
    }
    return AIOKafkaConsumer(*topics, group_id=group_id, client_id=client_id, max_poll_records=max_poll_records,
                            **{**defaults, **options}, **connection_options(settings.kafka))


def make_admin(settings: Settings | KafkaSettings, client_id: str = "lodestar-admin", **options: Any
               ) -> AIOKafkaAdminClient:
    """An admin client (topics, consumer groups, offsets) of the settings' broker, or of a `kafka` section on its
    own (scripts/probe_services.py); `options` are aiokafka admin arguments."""
    kafka = settings.kafka if isinstance(settings, Settings) else settings
    return AIOKafkaAdminClient(client_id=client_id, **options, **connection_options(kafka))


def decode_headers(headers: Headers | None) -> dict[str, str]:
    """Kafka headers as a str -> str mapping (undecodable bytes are replaced, never dropped)."""
    return {k: v.decode("utf-8", "replace") for k, v in (headers or [])}


def dead_letter_for(record: ConsumerRecord, *, stage: str, service: str, failure: BaseException | str) -> DeadLetter:
    """Wrap a consumed record that could not be processed, with why: an exception (its text and type) or a
    reason. The record's key and headers are cut to bounded sizes; the payload is kept whole (see
    `fit_dead_letter`)."""
    raw = bytes(record.value) if isinstance(record.value, bytes | bytearray) else b""
    key = record.key.decode("utf-8", "replace") if isinstance(record.key, bytes | bytearray) else None
    headers = dict(list(decode_headers(record.headers).items())[:MAX_HEADERS])
    headers = {clip(k, DEAD_LETTER_KEY_CHARS): clip(v, DEAD_LETTER_HEADER_CHARS) for k, v in headers.items()}
    if isinstance(failure, BaseException):
        reason = clip(" ".join((str(failure) or type(failure).__name__).split()), MAX_REASON_CHARS)
        kind = error_type(failure)
    else:
        reason, kind = clip(failure, MAX_REASON_CHARS), ""
    return DeadLetter(
        stage=stage,
        service=service,
        reason=reason,
        error_type=kind,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=None if key is None else clip(key, DEAD_LETTER_KEY_CHARS),
        payload=raw.decode("utf-8", "replace"),
        payload_bytes=len(raw),
        headers=headers,
    )


def fit_dead_letter(letter: DeadLetter, max_bytes: int) -> bytes:
    """The letter serialized in at most `max_bytes` (less record framing and its key): a payload that does not
    fit is cut and ends with a marker naming its original size, and `payload_truncated` is set."""
    budget = max_bytes - DEAD_LETTER_FRAMING_BYTES - len((letter.key or "").encode())
    data = letter.to_bytes()
    if len(data) <= budget:
        return data
    marker = f"…[truncated by lodestar: {letter.payload_bytes} bytes]"
    bare = len(letter.model_copy(update={"payload": marker, "payload_truncated": True}).to_bytes())
    if bare > budget:  # cannot happen with the bounded fields and a budget of >= 256 KiB
        raise ValueError(f"a dead letter without its payload is {bare} bytes, over {budget}")
    keep, cost = len(letter.payload), len(data) - bare  # characters kept, and what they cost in JSON
    while True:
        keep = min(keep - 1, int(keep * (budget - bare) / cost))  # escapes make some characters dearer
        data = letter.model_copy(update={"payload": letter.payload[:keep] + marker,
                                         "payload_truncated": True}).to_bytes()
        if len(data) <= budget:
            return data
        cost = len(data) - bare


class DeadLetterUnavailable(TransientFailure):
    """The dead-letter topic did not take a letter: the record it is about stays uncommitted until it does."""


class DeadLetters:
    """One service's dead-letter path: letters are fitted to the broker's message size, published to the
    dead-letter topic and acknowledged. A failure to publish one is never the record's fault (the DLQ is
    the last resort): it is raised as DeadLetterUnavailable, a transient failure."""

    def __init__(self, producer: AIOKafkaProducer, topics: Topics, service: str, max_message_bytes: int):
        self.producer = producer
        self.topics = topics
        self.service = service
        self.max_message_bytes = max_message_bytes

    def letter(self, record: ConsumerRecord, stage: str, failure: BaseException | str) -> DeadLetter:
        """A dead letter from this service for `record`."""
        return dead_letter_for(record, stage=stage, service=self.service, failure=failure)

    async def send(self, letters: Sequence[DeadLetter]) -> None:
        """Publish `letters` and wait for every acknowledgement."""
        if not letters:
            return
        for letter in letters:
            log.warning("dead letter from %s/%s: %s", letter.service, letter.stage, letter.reason)
        try:
            acks = [await self.producer.send(self.topics.dlq, fit_dead_letter(letter, self.max_message_bytes),
                                             key=(letter.key or "").encode() or None) for letter in letters]
            await asyncio.gather(*acks)
        except Exception as exc:
            raise DeadLetterUnavailable(f"the dead-letter topic {self.topics.dlq} did not take "
                                        f"{len(letters)} letters: {describe(exc, 500)}") from exc
