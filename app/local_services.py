"""Kafka and Redis for a local stack, through `scripts/services`: start the ones that do not answer,
and later stop exactly those (a service that was already running is left running); and the settings of
the secure endpoints that `scripts/services start --secure` writes to env files."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lodestar.settings import PROJECT_ROOT, Settings

SERVICES_SCRIPT = PROJECT_ROOT / "scripts" / "services"
SERVICE_NAMES = ("kafka", "redis")
SECURE_ENV_DIR = PROJECT_ROOT / ".run" / "secure"  # where `scripts/services start --secure` writes its env files


def secure_env_dir() -> Path:
    """The folder of the secure endpoints' env files: $LODESTAR_SECURE_ENV_DIR, else this tree's .run/secure."""
    return Path(os.environ.get("LODESTAR_SECURE_ENV_DIR") or SECURE_ENV_DIR)


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an `export KEY=VALUE` file (shell-quoted values), as `scripts/services` writes them."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"] and len(words) == 2 and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def settings_from_env(env: dict[str, str], **overrides: Any) -> Settings:
    """Settings whose kafka and redis values come from `env` (LODESTAR_KAFKA__X, LODESTAR_REDIS__X; they win over
    this process's own environment), plus `overrides` (init values, as the CLI gives them)."""
    sections: dict[str, dict[str, Any]] = {"kafka": {}, "redis": {}}
    for key, value in env.items():
        section, _, field = key.removeprefix("LODESTAR_").lower().partition("__")
        if section in sections and field:
            sections[section][field] = value
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return Settings(**sections)


class ServicesError(RuntimeError):
    """`scripts/services` failed; the message carries its output."""


class LocalServices:
    """Starts the missing local services and remembers which ones it started."""

    def __init__(self, settings: Settings, echo: Callable[[str], None] = print, script: Path = SERVICES_SCRIPT):
        self.script = script
        self.echo = echo
        self.env = {
            "LODESTAR_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
            "LODESTAR_REDIS__URL": settings.redis.url,
        }
        self.started: list[str] = []

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.script), *args], env={**os.environ, **self.env}, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False,
        )

    def answers(self, service: str) -> bool:
        """Whether the service answers at its configured address now."""
        return self._run("status", service).returncode == 0

    def ensure_running(self) -> list[str]:
        """Start whichever of Kafka and Redis does not answer; returns the ones started."""
        missing = [s for s in SERVICE_NAMES if not self.answers(s)]
        if not missing:
            self.echo("kafka and redis already answer: using them (they stay up afterwards)")
            return []
        done = self._run("start", *missing)
        for line in done.stdout.splitlines():
            self.echo(line)
        if done.returncode != 0:
            raise ServicesError(f"scripts/services start {' '.join(missing)} failed (exit {done.returncode})")
        self.started = missing
        return missing

    def stop_started(self) -> None:
        """Stop the services this object started (nothing else)."""
        if not self.started:
            return
        done = self._run("stop", *self.started)
        for line in done.stdout.splitlines():
            self.echo(line)
        self.started = []
