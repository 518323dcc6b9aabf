"""Kafka producers, consumers, admin clients and the dead-letter path, configured one way for every service.

Every Kafka client in the project is made here, so the broker address and its security (TLS, SASL; the
`kafka` settings section) reach every producer, consumer and admin call alike.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient

from lodestar.names import Topics
from lodestar.schemas import DeadLetter
from lodestar.settings import ConfigurationError, KafkaSettings, Settings

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]


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
    defaults: dict[str, Any] = {"acks": "all", "enable_idempotence": True, "linger_ms": 1, "compression_type": None}
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


def dead_letter_for(record: ConsumerRecord, *, stage: str, service: str, reason: str) -> DeadLetter:
    """Wrap a consumed record that could not be processed, with why."""
    raw = record.value if isinstance(record.value, bytes | bytearray) else b""
    key = record.key.decode("utf-8", "replace") if isinstance(record.key, bytes | bytearray) else None
    return DeadLetter(
        stage=stage,
        service=service,
        reason=reason,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=key,
        payload=bytes(raw).decode("utf-8", "replace"),
        headers=decode_headers(record.headers),
    )


async def send_dead_letter(producer: AIOKafkaProducer, topics: Topics, letter: DeadLetter) -> None:
    """Publish a dead letter and wait for the broker's acknowledgement."""
    log.warning("dead letter from %s/%s: %s", letter.service, letter.stage, letter.reason)
    await producer.send_and_wait(topics.dlq, letter.to_bytes(), key=(letter.key or "").encode() or None)
