"""Settings for every Lodestar service, from pydantic-settings.

Precedence, highest first: values passed by the CLI (as init kwargs) > environment variables
(`LODESTAR_` prefix, `__` for nesting, e.g. `LODESTAR_KAFKA__BOOTSTRAP_SERVERS`) > YAML file
(`LODESTAR_CONFIG` or `configs/lodestar.yaml`) > the defaults below.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "configs" / "lodestar.yaml"


class KafkaSettings(BaseModel):
    """Where the broker is and how the fixed topics are laid out."""

    bootstrap_servers: str = "127.0.0.1:19092"  # Kafka bootstrap servers, host:port[,host:port]
    topic_prefix: str = "lodestar."  # prefix of every topic name
    request_partitions: int = Field(12, ge=1)  # partitions of lodestar.requests: the unit of dispatcher scale-out
    worker_partitions: int = Field(1, ge=1)  # partitions of each lodestar.worker.<id> topic
    results_partitions: int = Field(6, ge=1)  # partitions of lodestar.results
    telemetry_partitions: int = Field(3, ge=1)  # partitions of lodestar.telemetry
    replication_factor: int = Field(1, ge=1)  # replication factor of topics Lodestar creates


class RedisSettings(BaseModel):
    """Where Redis is and the prefix of every key Lodestar writes."""

    url: str = "redis://127.0.0.1:16379/0"  # Redis URL (redis://host:port/db)
    key_prefix: str = "lodestar:"  # prefix of every Redis key


class PrefixSettings(BaseModel):
    """Block hashing and the router-side prefix index."""

    tokens_per_block: int = Field(16, ge=1)  # tokens per hashed prefix block (input_ids prompts)
    chars_per_block: int = Field(64, ge=1)  # characters per hashed prefix block (text prompts)
    index_capacity_blocks: int = Field(200_000, ge=1)  # blocks per worker in the router-side prefix index (LRU)


class LimitsSettings(BaseModel):
    """Bounds on what comes in from outside that depend on the deployment (the fixed ones are in the wire
    contract, lodestar/schemas.py). Every bound and its arithmetic: docs/architecture.md, Contracts."""

    max_message_bytes: int = Field(1_048_576, ge=262_144, le=100 * 1_048_576, description=(
        "largest record Lodestar produces (the producers' max_request_size), at most the broker's and topics' "
        "message.max.bytes; a request may be this minus 64 KiB, so that its routed copy fits"))
    max_token_id: int = Field(262_143, ge=0, le=2**31 - 1, description=(
        "largest token id accepted in `input_ids`: the model's vocabulary size - 1 (the default admits every "
        "current vocabulary up to 262,144 ids)"))
    reply_to_pattern: str = Field(r"{prefix}results|{prefix}reply\.[A-Za-z0-9._-]+", description=(
        "reply topics a request may name: a regular expression matched against the whole topic name, "
        "`{prefix}` standing for kafka.topic_prefix. Kafka's internal `__*` topics and Lodestar's own "
        "requests, worker, telemetry and DLQ topics are refused whatever it says"))

    @field_validator("reply_to_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value.replace("{prefix}", ""))
        except re.error as exc:
            raise ValueError(f"reply_to_pattern is not a regular expression: {exc}") from None
        return value


class DispatcherSettings(BaseModel):
    """The dispatcher service."""

    dispatcher_id: str = ""  # this dispatcher's id in decisions (default: host-pid)
    policy: str = "learned"  # routing policy: learned or any baseline name
    fallback_policy: str = "gpu_speed_queue"  # heuristic the learned policy uses until its model is validated
    batch_size: int = Field(64, ge=1)  # max requests consumed and routed per batch
    batch_timeout_ms: int = Field(5, ge=0)  # how long a batch fetch waits for more records
    registry_staleness_s: float = Field(0.25, gt=0)  # max age of the worker-state view before it is re-read from Redis
    no_worker_backoff_s: float = Field(0.2, gt=0)  # backoff between looks for a live worker
    no_worker_max_wait_s: float = Field(300.0, gt=0)  # max wait for a live worker; then rejected result + DLQ
    dead_worker_timeout_s: float = Field(15.0, gt=0)  # heartbeat gone this long: re-route its backlog
    consumer_group: str = "lodestar-dispatchers"  # consumer group of all dispatcher replicas
    metrics_port: int = Field(0, ge=0)  # Prometheus /metrics port (0 = off)


class WorkerSettings(BaseModel):
    """The worker service that wraps one SGLang engine."""

    worker_id: str = ""  # this worker's id (topic lodestar.worker.<id>)
    sglang_url: str = "http://127.0.0.1:30000"  # base URL of the SGLang server (or emulator) this worker wraps
    gpu_type: str = "H100"  # GPU type of the engine (see lodestar/hardware.py)
    max_concurrency: int = Field(256, ge=1)  # requests sent to the engine at once
    heartbeat_s: float = Field(1.0, gt=0, le=1.0)  # interval of state heartbeats to Redis
    state_ttl_s: float = Field(5.0, gt=0)  # TTL of the worker's state hash; expired = not routable
    load_poll_s: float = Field(0.25, gt=0)  # interval of engine load polls (/v1/loads)
    retry_attempts: int = Field(5, ge=0)  # retries of an engine call on 503 or connection errors
    retry_backoff_s: float = Field(0.1, gt=0)  # first retry backoff (doubles each attempt)
    dedupe_ttl_s: int = Field(3600, ge=1)  # how long request-id dedupe keys and stored results live
    max_stored_text_bytes: int = Field(16_384, ge=0, description=(
        "a result's text is stored in Redis (for a replay) only up to this many UTF-8 bytes; a longer one is "
        "stored without it (docs/architecture.md, stored results)"))
    request_timeout_s: float = Field(600.0, gt=0)  # timeout of one engine call
    metrics_port: int = Field(0, ge=0)  # Prometheus /metrics port (0 = off)


class LearnerSettings(BaseModel):
    """The online learner service."""

    model: str = "mlp"  # TTFT model family: mlp or river
    snapshot_every_events: int = Field(1000, ge=1)  # publish a snapshot after this many learned events
    snapshot_every_s: float = Field(30.0, gt=0)  # or after this many seconds
    warmup_snapshot_every_events: int = Field(100, ge=1)  # first snapshots: after 100, 200, 400... events
    checkpoint_path: Path = PROJECT_ROOT / ".run" / "learner" / "checkpoint.json"  # learner state checkpoint (JSON)
    hmac_key: str = "lodestar-dev-key-change-me"  # HMAC key signing model snapshots (set it in production)
    max_latency_ms: float = Field(600_000.0, gt=0)  # telemetry latencies above this are rejected to the DLQ
    consumer_group: str = "lodestar-learner"  # consumer group of the learner
    metrics_port: int = Field(0, ge=0)  # Prometheus /metrics port (0 = off)


class TelemetrySettings(BaseModel):
    """OpenTelemetry and logging. Standard OTEL_* variables are honoured by the SDK as well."""

    exporter: str = "none"  # none | console | otlp
    otlp_endpoint: str = "http://127.0.0.1:4318"  # OTLP/HTTP endpoint when exporter is otlp
    service_namespace: str = "lodestar"  # OpenTelemetry service.namespace
    log_json: bool = True  # JSON log lines (false: plain text)
    log_level: str = "INFO"  # log level
    metrics_host: str = "127.0.0.1"  # address the services' Prometheus endpoints bind (0.0.0.0 in containers)


class Settings(BaseSettings):
    """All of Lodestar's settings; each service reads its own section."""

    model_config = SettingsConfigDict(
        env_prefix="LODESTAR_",
        env_nested_delimiter="__",
        extra="forbid",
        yaml_file=None,
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    prefix: PrefixSettings = PrefixSettings()
    limits: LimitsSettings = LimitsSettings()
    dispatcher: DispatcherSettings = DispatcherSettings()
    worker: WorkerSettings = WorkerSettings()
    learner: LearnerSettings = LearnerSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    data_dir: Path = PROJECT_ROOT.parent / "shared" / "data"  # folder of the public traces and GPU profiles

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        config_file = Path(os.environ.get("LODESTAR_CONFIG", DEFAULT_CONFIG_FILE))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if config_file.exists():
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=config_file))
        return tuple(sources)


def load_settings(**overrides: Any) -> Settings:
    """Build settings; `overrides` are CLI values (nested dicts allowed) and win over everything."""
    return Settings(**overrides)
