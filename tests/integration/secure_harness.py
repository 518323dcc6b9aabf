"""Reading the secure endpoints' settings that `scripts/services start --secure` writes (.run/secure/*.env)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from lodestar.settings import Settings


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an `export KEY=VALUE` file (shell-quoted values), as scripts/services writes them."""
    env: dict[str, str] = {}
    for line in path.read_text().splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["export"] and len(words) == 2 and "=" in words[1]:
            key, value = words[1].split("=", 1)
            env[key] = value
    return env


def settings_from_env(env: dict[str, str], **overrides: Any) -> Settings:
    """Settings whose kafka and redis sections come from `env` (LODESTAR_KAFKA__X, LODESTAR_REDIS__X) alone,
    whatever this process's own environment says, plus `overrides` (init values, as the CLI gives them)."""
    sections: dict[str, dict[str, Any]] = {"kafka": {}, "redis": {}}
    for key, value in env.items():
        section, _, field = key.removeprefix("LODESTAR_").lower().partition("__")
        if section in sections and field:
            sections[section][field] = value
    for name, values in overrides.items():
        sections[name] = {**sections.get(name, {}), **values}
    return Settings(**sections)
