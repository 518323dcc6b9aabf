"""compose.yaml is checked by parsing, and by interpolating its variables as compose does (Docker does not run
here): secrets have no defaults, Redis and Grafana are locked, and what the services get are valid settings."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from settings_env import settings_env_names

from lodestar.settings import PROJECT_ROOT, Settings
from lodestar.snapshot_keys import signing_key, verification_keys

COMPOSE = PROJECT_ROOT / "compose.yaml"


def _compose() -> dict[str, Any]:
    return yaml.safe_load(Path(COMPOSE).read_text())


def test_services_present_with_expected_images() -> None:
    services = _compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:4")
    assert services["redis"]["image"].startswith("redis:")
    assert services["dispatcher"]["deploy"]["replicas"] == 2
    for name in ("learner", "worker-h100", "worker-a30", "emulator-h100", "emulator-a30", "jaeger"):
        assert name in services, name
    gpu = services["sglang"]
    assert gpu["profiles"] == ["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_every_lodestar_env_var_is_a_setting() -> None:
    known = settings_env_names()
    for name, service in _compose()["services"].items():
        for var in (service.get("environment") or {}):
            if var.startswith("LODESTAR_"):
                assert var in known, f"{name}: {var} does not match any field of the settings model"


def test_services_commands_are_lodestar_subcommands() -> None:
    import typer.main

    from app.cli import app

    click_app = typer.main.get_command(app)
    commands = set(click_app.commands)  # type: ignore[attr-defined]
    for name, service in _compose()["services"].items():
        if service.get("image") == "lodestar:latest":
            assert service["command"][0] in commands, f"{name} runs unknown subcommand {service['command'][0]}"


SECRETS = {"LODESTAR_SNAPSHOT_KEY", "LODESTAR_REDIS_PASSWORD", "GRAFANA_ADMIN_PASSWORD"}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:[?-])(?P<arg>[^}]*))?\}")


class MissingVariable(LookupError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's interpolation of the forms compose.yaml uses: ${VAR}, ${VAR:-default}, ${VAR:?error}, $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"]
        if env.get(name):
            return env[name]
        if op == ":?":
            raise MissingVariable(f"{name}: {arg}")
        return arg if op == ":-" else ""

    parts = value.split("$$")
    return "$".join(_VARIABLE.sub(one, part) for part in parts)


def _secret_env() -> dict[str, str]:
    return {"LODESTAR_SNAPSHOT_KEY": "ab" * 32, "LODESTAR_REDIS_PASSWORD": "cd" * 24,
            "GRAFANA_ADMIN_PASSWORD": "ef" * 16}


def test_every_secret_is_required_from_the_environment_with_no_default() -> None:
    text = Path(COMPOSE).read_text()
    for name in SECRETS:
        uses = re.findall(rf"\$\{{{name}(?![A-Za-z0-9_])(:[?-])?", text)
        assert uses and set(uses) == {":?"}, f"{name} must be used only as ${{{name}:?...}}: {uses}"
    for missing in SECRETS:
        env = {k: v for k, v in _secret_env().items() if k != missing}
        with pytest.raises(MissingVariable, match=missing):
            interpolate(_compose(), env)
    interpolate(_compose(), _secret_env())  # all set: nothing else is required


def test_no_password_or_key_is_written_in_the_file() -> None:
    for name, service in _compose()["services"].items():
        for var, value in (service.get("environment") or {}).items():
            if re.search(r"PASSWORD|_KEY$|SECRET|TOKEN", var) and var != "HF_TOKEN":
                assert isinstance(value, str) and value.startswith("${") and ":?" in value, f"{name}: {var}={value!r}"


def test_lodestar_services_get_valid_settings_and_only_signers_and_verifiers_get_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    compose = interpolate(_compose(), _secret_env())
    for var in [v for v in os.environ if v.startswith("LODESTAR_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("LODESTAR_CONFIG", str(PROJECT_ROOT / "absent.yaml"))
    holders = set()
    for name, service in compose["services"].items():
        if service.get("image") != "lodestar:latest" or name.startswith("emulator"):
            continue
        env = service.get("environment") or {}
        with monkeypatch.context() as m:
            for var, value in env.items():
                m.setenv(var, str(value))
            settings = Settings()
            assert settings.redis.username == "lodestar" and settings.redis.password.get_secret_value()
            assert not settings.dev_mode
            if settings.snapshot_signing.key.get_secret_value():
                holders.add(name)
                assert signing_key(settings).secret == _secret_env()["LODESTAR_SNAPSHOT_KEY"].encode()
                assert verification_keys(settings)  # strong enough to start
    assert holders == {"learner", "dispatcher"}


def test_redis_needs_a_password_persists_and_never_evicts() -> None:
    redis = interpolate(_compose(), _secret_env())["services"]["redis"]
    script = redis["command"][0]
    assert "user default off" in script and "user lodestar on >%s ~lodestar:* &lodestar:*" in script
    assert "-@dangerous" in script
    for option in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction", "--maxmemory "):
        assert option in script, option
    assert redis["environment"]["REDIS_PASSWORD"] == _secret_env()["LODESTAR_REDIS_PASSWORD"]
    assert "$REDIS_PASSWORD" in script  # expanded by the container's shell, not on its command line
    assert any(v.startswith("redis-data:") for v in redis["volumes"])
    assert "--user lodestar" in " ".join(redis["healthcheck"]["test"])


def test_grafana_has_no_default_credentials() -> None:
    env = _compose()["services"]["grafana"]["environment"]
    assert env["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")
    assert env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"  # anonymous visitors may only look
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false"
