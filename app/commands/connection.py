"""Command-line overrides of where Kafka and Redis are, shared by the service commands."""

from __future__ import annotations

from typing import Any


def connection_overrides(bootstrap_servers: str | None, redis_url: str | None = None) -> dict[str, Any]:
    """Settings overrides for `--bootstrap-servers` and `--redis-url` (only those given)."""
    overrides: dict[str, Any] = {}
    if bootstrap_servers:
        overrides["kafka"] = {"bootstrap_servers": bootstrap_servers}
    if redis_url:
        overrides["redis"] = {"url": redis_url}
    return overrides
