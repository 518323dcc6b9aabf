"""Settings for every Lodestar service, from pydantic-settings.

Precedence, highest first: values passed by the CLI (as init kwargs) > environment variables
(`LODESTAR_` prefix, `__` for nesting, e.g. `LODESTAR_KAFKA__BOOTSTRAP_SERVERS`) > YAML file
(`LODESTAR_CONFIG` or `configs/lodestar.yaml`) > the defaults below.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field
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

    bootstrap_servers: str = "127.0.0.1:19092"
    topic_prefix: str = "lodestar."
    request_partitions: int = Field(12, ge=1)
    worker_partitions: int = Field(1, ge=1)
    results_partitions: int = Field(6, ge=1)
    telemetry_partitions: int = Field(3, ge=1)
    replication_factor: int = Field(1, ge=1)


class RedisSettings(BaseModel):
    """Where Redis is and the prefix of every key Lodestar writes."""

    url: str = "redis://127.0.0.1:16379/0"
    key_prefix: str = "lodestar:"


class PrefixSettings(BaseModel):
    """Block hashing and the router-side prefix index."""

    tokens_per_block: int = Field(16, ge=1)
    chars_per_block: int = Field(64, ge=1)
    index_capacity_blocks: int = Field(200_000, ge=1)


class DispatcherSettings(BaseModel):
    """The dispatcher service."""

    dispatcher_id: str = ""
    policy: str = "learned"
    fallback_policy: str = "gpu_speed_queue"
    batch_size: int = Field(64, ge=1)
    batch_timeout_ms: int = Field(5, ge=0)
    registry_staleness_s: float = Field(0.25, gt=0)
    no_worker_backoff_s: float = Field(0.2, gt=0)
    no_worker_max_wait_s: float = Field(300.0, gt=0)
    dead_worker_timeout_s: float = Field(15.0, gt=0)  # heartbeat gone this long: re-route its backlog
    consumer_group: str = "lodestar-dispatchers"
    metrics_port: int = Field(0, ge=0)


class WorkerSettings(BaseModel):
    """The worker service that wraps one SGLang engine."""

    worker_id: str = ""
    sglang_url: str = "http://127.0.0.1:30000"
    gpu_type: str = "H100"
    max_concurrency: int = Field(256, ge=1)
    heartbeat_s: float = Field(1.0, gt=0, le=1.0)
    state_ttl_s: float = Field(5.0, gt=0)
    load_poll_s: float = Field(0.25, gt=0)
    retry_attempts: int = Field(5, ge=0)
    retry_backoff_s: float = Field(0.1, gt=0)
    dedupe_ttl_s: int = Field(3600, ge=1)
    request_timeout_s: float = Field(600.0, gt=0)
    metrics_port: int = Field(0, ge=0)


class LearnerSettings(BaseModel):
    """The online learner service."""

    model: str = "mlp"
    snapshot_every_events: int = Field(1000, ge=1)
    snapshot_every_s: float = Field(30.0, gt=0)
    checkpoint_path: Path = PROJECT_ROOT / ".run" / "learner" / "checkpoint.json"
    hmac_key: str = "lodestar-dev-key-change-me"
    max_latency_ms: float = Field(600_000.0, gt=0)
    consumer_group: str = "lodestar-learner"
    metrics_port: int = Field(0, ge=0)


class TelemetrySettings(BaseModel):
    """OpenTelemetry and logging. Standard OTEL_* variables are honoured by the SDK as well."""

    exporter: str = "none"  # none | console | otlp
    otlp_endpoint: str = "http://127.0.0.1:4318"
    service_namespace: str = "lodestar"
    log_json: bool = True
    log_level: str = "INFO"
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
    telemetry: TelemetrySettings = TelemetrySettings()
    data_dir: Path = PROJECT_ROOT.parent / "shared" / "data"

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
