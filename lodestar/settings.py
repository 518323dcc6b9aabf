"""Settings for every Lodestar service, from pydantic-settings.

Precedence, highest first: values passed by the CLI (as init kwargs) > environment variables
(`LODESTAR_` prefix, `__` for nesting, e.g. `LODESTAR_KAFKA__BOOTSTRAP_SERVERS`) > YAML file
(`LODESTAR_CONFIG` or `configs/lodestar.yaml`) > the defaults below.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from lodestar.snapshot import KEY_ID_PATTERN

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_FILE = PROJECT_ROOT / "configs" / "lodestar.yaml"


class ConfigurationError(ValueError):
    """The settings cannot be used as given; the message says which key and why (never a secret's value)."""


class Section(BaseModel):
    """A settings section: an unknown key is an error (a misspelt key must not silently keep its default)."""

    model_config = ConfigDict(extra="forbid")


KafkaSecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
KafkaSaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


def _secret_set(value: SecretStr) -> bool:
    return bool(value.get_secret_value())


def _given(values: dict[str, Any]) -> list[str]:
    """The names whose value is set (not None, not empty, not an empty secret)."""
    return [name for name, v in values.items()
            if v is not None and (v.get_secret_value() if isinstance(v, SecretStr) else v) != ""]


def _unused(section: str, names: list[str], why: str) -> None:
    if names:
        raise ValueError(f"{', '.join(f'{section}.{n}' for n in names)} set, but {why}")


class KafkaSettings(Section):
    """Where the broker is, how clients authenticate to it, and how the fixed topics are laid out.

    Every producer, consumer and admin client is built from this section (lodestar/kafka_io.py). TLS
    (`SSL`, `SASL_SSL`) verifies the broker against `ssl_cafile` (or the system CAs) and, with
    `ssl_check_hostname`, its name; `ssl_certfile`/`ssl_keyfile` add a client certificate (mutual TLS).
    SASL (`SASL_SSL`; `SASL_PLAINTEXT` sends the credentials in the clear) logs in with
    `sasl_mechanism` as `sasl_username`. See docs/security.md."""

    bootstrap_servers: str = "127.0.0.1:19092"  # Kafka bootstrap servers, host:port[,host:port]
    security_protocol: KafkaSecurityProtocol = "PLAINTEXT"  # TLS (SSL), SASL login, both (SASL_SSL) or neither
    sasl_mechanism: KafkaSaslMechanism = "SCRAM-SHA-512"  # with SASL_*: how to log in (PLAIN sends the password)
    sasl_username: str = ""  # with SASL_*: the principal's user name
    sasl_password: SecretStr = SecretStr("")  # with SASL_*: its password
    ssl_cafile: Path | None = None  # with SSL/SASL_SSL: PEM file of the CA(s) to trust (default: the system's)
    ssl_certfile: Path | None = None  # with SSL/SASL_SSL: client certificate chain, PEM (mutual TLS)
    ssl_keyfile: Path | None = None  # its private key, PEM (default: inside ssl_certfile)
    ssl_key_password: SecretStr = SecretStr("")  # password of an encrypted private key
    ssl_check_hostname: bool = True  # with SSL/SASL_SSL: the broker certificate must name the host dialled
    topic_prefix: str = "lodestar."  # prefix of every topic name
    request_partitions: int = Field(12, ge=1)  # partitions of lodestar.requests: the unit of dispatcher scale-out
    worker_partitions: int = Field(1, ge=1)  # partitions of each lodestar.worker.<id> topic
    results_partitions: int = Field(6, ge=1)  # partitions of lodestar.results
    telemetry_partitions: int = Field(3, ge=1)  # partitions of lodestar.telemetry
    replication_factor: int = Field(1, ge=1)  # replication factor of topics Lodestar creates

    @property
    def uses_tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    @model_validator(mode="after")
    def _consistent_security(self) -> KafkaSettings:
        sasl = _given({"sasl_username": self.sasl_username, "sasl_password": self.sasl_password})
        tls = _given({"ssl_cafile": self.ssl_cafile, "ssl_certfile": self.ssl_certfile,
                      "ssl_keyfile": self.ssl_keyfile, "ssl_key_password": self.ssl_key_password})
        protocol = self.security_protocol
        if self.uses_sasl and (missing := [n for n in ("sasl_username", "sasl_password") if n not in sasl]):
            raise ValueError(f"security_protocol {protocol} needs {' and '.join(f'kafka.{n}' for n in missing)}")
        if not self.uses_sasl:
            _unused("kafka", sasl, f"security_protocol {protocol} does not use SASL")
        if not self.uses_tls:
            _unused("kafka", tls, f"security_protocol {protocol} does not use TLS")
        if self.ssl_certfile is None:
            _unused("kafka", [n for n in tls if n in ("ssl_keyfile", "ssl_key_password")],
                    "there is no kafka.ssl_certfile (the client certificate) to go with it")
        return self


class RedisSettings(Section):
    """Where Redis is, how Lodestar authenticates to it, and the prefix of every key Lodestar writes.

    Every Redis client is built from this section (lodestar/redis_io.py). `rediss://` URLs use TLS,
    verified against `ssl_cafile` (or the system CAs); `ssl_certfile`/`ssl_keyfile` add a client
    certificate. `username`/`password` log in as a Redis ACL user (the password alone: the `default`
    user); keep the password here rather than in the URL, where it would show in logs. See docs/security.md."""

    url: str = "redis://127.0.0.1:16379/0"  # Redis URL: redis://host:port/db, or rediss:// for TLS
    username: str = ""  # ACL user to log in as (needs the password; empty: the default user)
    password: SecretStr = SecretStr("")  # password of that user (requirepass for the default user)
    ssl_cafile: Path | None = None  # with rediss://: PEM file of the CA(s) to trust (default: the system's)
    ssl_certfile: Path | None = None  # with rediss://: client certificate, PEM (for tls-auth-clients)
    ssl_keyfile: Path | None = None  # its private key, PEM (default: inside ssl_certfile)
    ssl_check_hostname: bool = True  # with rediss://: the server certificate must name the host dialled
    key_prefix: str = "lodestar:"  # prefix of every Redis key

    @property
    def uses_tls(self) -> bool:
        return urlsplit(self.url).scheme == "rediss"

    @model_validator(mode="after")
    def _consistent_security(self) -> RedisSettings:
        parts = urlsplit(self.url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"url must start with redis://, rediss:// or unix://, not {parts.scheme or '(none)'}://")
        if parts.password and _secret_set(self.password):
            raise ValueError("the password is given twice, in url and in redis.password: keep only redis.password")
        if parts.username and self.username:
            raise ValueError("the user name is given twice, in url and in redis.username: keep only redis.username")
        if self.username and not _secret_set(self.password) and not parts.password:
            raise ValueError("redis.username needs redis.password")
        if not self.uses_tls:
            _unused("redis", _given({"ssl_cafile": self.ssl_cafile, "ssl_certfile": self.ssl_certfile,
                                     "ssl_keyfile": self.ssl_keyfile}), "url is not rediss:// (TLS)")
        if self.ssl_keyfile is not None and self.ssl_certfile is None:
            raise ValueError("redis.ssl_keyfile set, but there is no redis.ssl_certfile to go with it")
        return self


class PrefixSettings(Section):
    """Block hashing and the router-side prefix index."""

    tokens_per_block: int = Field(16, ge=1)  # tokens per hashed prefix block (input_ids prompts)
    chars_per_block: int = Field(64, ge=1)  # characters per hashed prefix block (text prompts)
    index_capacity_blocks: int = Field(200_000, ge=1)  # blocks per worker in the router-side prefix index (LRU)


class LimitsSettings(Section):
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


class DispatcherSettings(Section):
    """The dispatcher service."""

    dispatcher_id: str = ""  # this dispatcher's id in decisions (default: host-pid)
    policy: str = "learned"  # routing policy: learned or any baseline name (docs/policies.md)
    policy_params: dict[str, dict[str, Any]] = Field(default_factory=dict, description=(
        "parameters by policy name, e.g. `{learned: {worker_correction: false}}`, validated against the policy's "
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
                "dispatcher.fallback_policy was removed: the learned policy has no heuristic fallback, it "
                "routes with the analytic TTFT estimate until a learned correction beats it (docs/learning.md)")
        return data


class WorkerSettings(Section):
    """The worker service that wraps one SGLang engine."""

    worker_id: str = ""  # this worker's id (topic lodestar.worker.<id>)
    sglang_url: str = "http://127.0.0.1:30000"  # base URL of the SGLang server (or emulator) this worker wraps
    gpu_type: str = "H100"  # GPU type of the engine (see lodestar/hardware.py)
    max_concurrency: int = Field(256, ge=1)  # requests sent to the engine at once
    heartbeat_s: float = Field(1.0, gt=0, le=1.0)  # interval of state heartbeats to Redis
    state_ttl_s: float = Field(5.0, gt=0)  # TTL of the worker's state hash; expired = not routable
    load_poll_s: float = Field(0.25, gt=0)  # interval of engine load polls (/v1/loads)
    retry_attempts: int = Field(5, ge=0)  # retries of an engine call on 408/429/500/502/503/504 or connection errors
    retry_backoff_s: float = Field(0.1, gt=0)  # first retry backoff (doubles each attempt, jittered)
    retry_max_backoff_s: float = Field(2.0, gt=0)  # longest pause between two retries of an engine call
    retry_budget_ratio: float = Field(0.2, ge=0, description=(
        "engine retries may add at most this fraction of the worker's calls of the last 10 s (plus 10 retries): "
        "an engine failing every call gets ~1.2 attempts per request, not 1 + retry_attempts"))
    generation_timeout_s: float = Field(300.0, gt=0, description=(
        "the longest one generation may take, every retry included (request_timeout_s bounds one read); a "
        "request's own deadline_ms cuts it shorter"))
    breaker_failures: int = Field(5, ge=1, description=(
        "consecutive engine failures that open the worker's circuit breaker: the engine is declared dead, the "
        "worker stops advertising itself and abandons its in-flight requests to redelivery (workers/breaker.py)"))
    breaker_cooldown_s: float = Field(5.0, gt=0)  # how long the breaker stays open before a half-open probe
    breaker_probe_timeout_s: float = Field(10.0, gt=0)  # the half-open probe generation's time limit
    dedupe_ttl_s: int = Field(3600, ge=1)  # how long request-id dedupe keys and stored results live
    max_stored_text_bytes: int = Field(16_384, ge=0, description=(
        "a result's text is stored in Redis (for a replay) only up to this many UTF-8 bytes; a longer one is "
        "stored without it (docs/architecture.md, stored results)"))
    request_timeout_s: float = Field(600.0, gt=0)  # timeout of one engine call
    engine_api_key: SecretStr = SecretStr("")  # the engine's API key (SGLang --api-key), sent as a Bearer token
    metrics_port: int = Field(0, ge=0)  # Prometheus /metrics port (0 = off)


class LearnerSettings(Section):
    """The online learner service."""

    model: str = "ridge_residual"  # TTFT model family (a module of learner/models/; docs/policies.md lists them)
    snapshot_every_events: int = Field(1000, ge=1)  # publish a snapshot after this many learned events
    snapshot_every_s: float = Field(30.0, gt=0)  # or after this many seconds
    warmup_snapshot_every_events: int = Field(100, ge=1)  # first snapshots: after 100, 200, 400... events
    checkpoint_path: Path = PROJECT_ROOT / ".run" / "learner" / "checkpoint.json"  # learner state checkpoint (JSON)
    max_latency_ms: float = Field(600_000.0, gt=0)  # telemetry latencies above this are rejected to the DLQ
    consumer_group: str = "lodestar-learner"  # consumer group of the learner
    metrics_port: int = Field(0, ge=0)  # Prometheus /metrics port (0 = off)


class GatewaySettings(Section):
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


class SnapshotSigningSettings(Section):
    """HMAC-SHA256 signing of the model snapshots the learner publishes through Redis.

    The learner signs with `key` and writes `key_id` into each snapshot; dispatchers (and `lodestar up`'s
    readiness probes) accept a snapshot only if it verifies under the key its id names, among `key` and
    `accepted_keys`. Every key must be at least 32 bytes (e.g. `openssl rand -hex 32`) and not a published
    one: services refuse to start otherwise, unless `dev_mode` is on. Rotating the key without
    downtime: docs/security.md."""

    key_id: str = Field("k1", pattern=f"^{KEY_ID_PATTERN.pattern}$")  # id of `key`, written into what it signs
    key: SecretStr = SecretStr("")  # the current key: the learner signs with it, dispatchers verify with it
    accepted_keys: dict[str, SecretStr] = {}  # more keys accepted when verifying (rotation); env: JSON {"id": "key"}

    @model_validator(mode="after")
    def _ids(self) -> SnapshotSigningSettings:
        for key_id, key in self.accepted_keys.items():
            if not KEY_ID_PATTERN.fullmatch(key_id):
                raise ValueError(f"accepted_keys: key id {key_id!r} is not 1-64 of [A-Za-z0-9._-]")
            if key_id == self.key_id and key.get_secret_value() != self.key.get_secret_value():
                raise ValueError(f"accepted_keys: key id {key_id!r} is the current key_id with a different key")
        return self


class TelemetrySettings(Section):
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
    gateway: GatewaySettings = GatewaySettings()
    snapshot_signing: SnapshotSigningSettings = SnapshotSigningSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    dev_mode: bool = False  # development only: accept a missing, short or published snapshot signing key
    stop_step_timeout_s: float = Field(10.0, gt=0, le=3600, description=(
        "the longest one step of a service's stop may take (its background tasks, each stop step, each client's "
        "stop and flush); then the step is abandoned with a WARNING naming it and its stack (lodestar/lifecycle.py)"))
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
    """Build settings; `overrides` are CLI values (nested dicts allowed) and win over everything.

    Raises ConfigurationError naming each bad key, its environment variable and what is wrong with it."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigurationError(describe_errors(exc)) from None


def describe_errors(exc: ValidationError) -> str:
    """The errors of a settings validation, one per line, without the values given (they may be secrets)."""
    lines = ["invalid settings:"]
    for error in exc.errors(include_url=False, include_input=False):
        loc = [str(part) for part in error["loc"]]
        where = ".".join(loc) or "(settings)"
        message = error["msg"].removeprefix("Value error, ")
        if error["type"] == "extra_forbidden":
            message = f"unknown key{_known_keys(loc[:-1])}"
        elif _section(loc) is not None:  # a check across the section's keys: the message names them
            lines.append(f"  {where}: {message}")
            continue
        lines.append(f"  {where} (LODESTAR_{'__'.join(loc).upper()}): {message}")
    return "\n".join(lines)


def _section(path: list[str]) -> type[BaseModel] | None:
    """The settings section (model) at `path`, or None if it names no section."""
    model: Any = Settings
    for part in path:
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return None
        model = field.annotation
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _known_keys(section_path: list[str]) -> str:
    section = _section(section_path)
    return f" (known: {', '.join(section.model_fields)})" if section is not None else ""


def settings_env(settings: Settings, *names: str) -> dict[str, str]:
    """The `LODESTAR_...` environment variables that give a child process these sections (or top-level
    settings) exactly as they are here, secrets included: pass them only in a child's environment. Optional
    values left unset (None) are left out."""
    env: dict[str, str] = {}
    for name in names:
        value = getattr(settings, name)
        if isinstance(value, BaseModel):
            for key in type(value).model_fields:
                if (inner := getattr(value, key)) is not None:
                    env[f"LODESTAR_{name.upper()}__{key.upper()}"] = _env_text(inner)
        elif value is not None:
            env[f"LODESTAR_{name.upper()}"] = _env_text(value)
    return env


def _env_text(value: Any) -> str:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, dict):
        return json.dumps({k: _env_text(v) for k, v in value.items()})
    return str(value)
