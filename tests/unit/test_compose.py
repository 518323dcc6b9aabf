"""compose.yaml is checked by parsing (Docker does not run here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from settings_env import settings_env_names

from lodestar.settings import PROJECT_ROOT

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


def test_the_gateway_needs_keys_or_says_it_has_none() -> None:
    gateway = _compose()["services"]["gateway"]
    assert gateway["profiles"] == ["gateway"] and gateway["command"] == ["gateway"]
    env = gateway["environment"]
    assert env["LODESTAR_GATEWAY__API_KEY_HASHES"] == "${LODESTAR_GATEWAY_KEY_HASHES:-[]}"
    assert env["LODESTAR_GATEWAY__ALLOW_ANONYMOUS"] == "${LODESTAR_GATEWAY_ANONYMOUS:-false}"
    assert gateway["ports"] == [f"{env['LODESTAR_GATEWAY__PORT']}:{env['LODESTAR_GATEWAY__PORT']}"]
    scrape = yaml.safe_load((PROJECT_ROOT / "configs" / "prometheus.yml").read_text())["scrape_configs"]
    (job,) = [j for j in scrape if j["job_name"] == "gateway"]
    assert job["dns_sd_configs"][0]["port"] == int(env["LODESTAR_GATEWAY__PORT"])
