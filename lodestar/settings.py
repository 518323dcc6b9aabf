"""Settings for every Lodestar service, from pydantic-settings.

Precedence, highest first: values passed by the CLI (as init kwargs) > environment variables
(`LODESTAR_` prefix, `__` for nesting, e.g. `LODESTAR_KAFKA__BOOTSTRAP_SERVERS`) > YAML file
(`LODESTAR_CONFIG` or `configs/lodestar.yaml`) > the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, model_validator
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


class DispatcherSettings(BaseModel):
    """The dispatcher service."""

    dispatcher_id: str = ""  # this dispatcher's id in decisions (default: host-pid)
    policy: str = "learned"  # routing policy: learned or any baseline name (docs/policies.md)
    policy_params: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "parameters by policy name, e.g. `{learned: {fallback: lmetric}}`, validated against the policy's "
        "constructor at start (docs/policies.md lists each policy's parameters)"))
    batch_size: int = Field(64, ge=1)  # max requests consumed and routed per batch
    batch_timeout_ms: int = Field(5, ge=0)  # how long a batch fetch waits for more records
    registry_staleness_s: float = Field(0.25, gt=0)  # max age of the worker-state view before it is re-read from Redis
    no_worker_backoff_s: float = Field(0.2, gt=0)  # backoff between looks for a live worker
    no_worker_max_wait_s: float = Field(300.0, gt=0)  # max wait for a live worker; then rejected result + DLQ
    dead_worker_timeout_s: float = Field(15.0, gt=0)  # heartbeat gone this long: re-route its backlog
    consumer_group: str = "lodestar-dispatchers"  # consumer group of all dispatcher replicas
    metrics_port: int = Field(0, ge=0)  # Prometheus /metrics port (0 = off)

    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and "fallback_policy" in data:
            raise ValueError(
                "dispatcher.fallback_policy was removed: the fallback is a parameter of the learned policy, "
                "set dispatcher.policy_params.learned.fallback (YAML) or "
                "LODESTAR_DISPATCHER__POLICY_PARAMS='{\"learned\": {\"fallback\": \"...\"}}'")
        return data


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
    request_timeout_s: float = Field(600.0, gt=0)  # timeout of one engine call
    metrics_port: int = Field(0, ge=0)  # Prometheus /metrics port (0 = off)


class LearnerSettings(BaseModel):
    """The online learner service."""

    model: str = "mlp"  # TTFT model family (a module of learner/models/; docs/policies.md lists them)
    snapshot_every_events: int = Field(1000, ge=1)  # publish a snapshot after this many learned events
    snapshot_every_s: float = Field(30.0, gt=0)  # or after this many seconds
    warmup_snapshot_every_events: int = Field(100, ge=1)  # first snapshots: after 100, 200, 400... events
    checkpoint_path: Path = PROJECT_ROOT / ".run" / "learner" / "checkpoint.json"  # learner state checkpoint (JSON)
    hmac_key: str = "lodestar-dev-key-change-me"  # HMAC key signing model snapshots (set it in production)
    max_latency_ms: float = Field(600_000.0, gt=0)  # telemetry latencies above this are rejected to the DLQ
    consumer_group: str = "lodestar-learner"  # consumer group of the learner
    metrics_port: int = Field(0, ge=0)  # Prometheus /metrics port (0 = off)


class GatewaySettings(BaseModel):
    """The OpenAI-compatible HTTP gateway (docs/gateway.md)."""

    gateway_id: str = ""  # this gateway's id: its reply topic is <topic prefix>reply.<id> (default: host-pid)
    host: str = "127.0.0.1"  # address the HTTP server binds (0.0.0.0 in containers)
    port: int = Field(8000, ge=0, le=65535)  # HTTP port of the API, /health, /metrics, /healthz and /readyz
    model_name: str = "meta-llama/Llama-3.1-8B-Instruct"  # the model /v1/models lists; other names get 404
    context_length: int = Field(131_072, ge=1)  # max_model_len /v1/models reports (the engines' context length)
    api_key_hashes: list[str] = Field(default_factory=list, description=(
        "SHA-256 hex digests of the accepted bearer tokens (`printf %s KEY | sha256sum`); the keys themselves "
        "are never stored"))
    allow_anonymous: bool = False  # serve requests without an API key (development only; no key is accepted then)
    rate_limit_per_s: float = Field(20.0, ge=0)  # requests per second per API key, across every gateway (0 = off)
    rate_limit_burst: int = Field(40, ge=1)  # token bucket size: requests a key may send at once
    max_in_flight: int = Field(1024, ge=1)  # requests one gateway serves at once; more get 429
    max_waiting_per_worker: float = Field(64.0, ge=0, description=(
        "engines' queued requests per routable worker (the registry's average) at which new requests get 429 "
        "(0 = off)"))
    max_body_bytes: int = Field(768 * 1024, ge=1024)  # largest request body (a request must fit a Kafka message)
    max_reply_chars: int = Field(64 * 1024 * 1024, ge=1024)  # longest answer (all its chunks) one request may hold
    request_timeout_s: float = Field(600.0, gt=0)  # a request's deadline: then 504 and the generation is aborted
    reply_partitions: int = Field(2, ge=1)  # partitions of the gateway's reply topic
    delete_reply_topic: bool = False  # delete the reply topic when the gateway stops (ids that never come back)


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
    dispatcher: DispatcherSettings = DispatcherSettings()
    worker: WorkerSettings = WorkerSettings()
    learner: LearnerSettings = LearnerSettings()
    gateway: GatewaySettings = GatewaySettings()
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
