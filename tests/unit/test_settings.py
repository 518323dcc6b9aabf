"""Settings precedence: CLI > env > YAML file > defaults."""

from __future__ import annotations

from pathlib import Path

import pytest

from lodestar.settings import load_settings


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "lodestar.yaml"
    path.write_text("kafka:\n  bootstrap_servers: file:1\n  request_partitions: 7\nredis:\n  url: redis://file:2/0\n")
    monkeypatch.setenv("LODESTAR_CONFIG", str(path))
    for var in ("LODESTAR_KAFKA__BOOTSTRAP_SERVERS", "LODESTAR_REDIS__URL", "LODESTAR_KAFKA__REQUEST_PARTITIONS"):
        monkeypatch.delenv(var, raising=False)
    return path


def test_defaults_without_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LODESTAR_CONFIG", str(tmp_path / "absent.yaml"))
    monkeypatch.delenv("LODESTAR_KAFKA__BOOTSTRAP_SERVERS", raising=False)
    s = load_settings()
    assert s.kafka.bootstrap_servers == "127.0.0.1:19092"
    assert s.kafka.request_partitions == 12


def test_file_overrides_defaults(config_file: Path) -> None:
    s = load_settings()
    assert s.kafka.bootstrap_servers == "file:1"
    assert s.kafka.request_partitions == 7
    assert s.kafka.topic_prefix == "lodestar."  # untouched keys keep their defaults


def test_env_overrides_file(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LODESTAR_KAFKA__BOOTSTRAP_SERVERS", "env:3")
    s = load_settings()
    assert s.kafka.bootstrap_servers == "env:3"
    assert s.kafka.request_partitions == 7  # the file still supplies what env does not set
    assert s.redis.url == "redis://file:2/0"


def test_cli_overrides_env(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LODESTAR_KAFKA__BOOTSTRAP_SERVERS", "env:3")
    s = load_settings(kafka={"bootstrap_servers": "cli:4"})
    assert s.kafka.bootstrap_servers == "cli:4"
    assert s.kafka.request_partitions == 7


def test_bad_value_is_a_clear_error(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LODESTAR_KAFKA__REQUEST_PARTITIONS", "0")
    with pytest.raises(ValueError, match="request_partitions"):
        load_settings()


def test_unknown_section_rejected(config_file: Path) -> None:
    with pytest.raises(ValueError, match="nonsense"):
        load_settings(nonsense={"a": 1})


def test_policy_parameters_come_from_the_file_and_env(config_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config_file.write_text("dispatcher:\n  policy_params:\n    learned:\n      fallback: lmetric\n"
                           "      epsilon_start: 0.1\n")
    assert load_settings().dispatcher.policy_params == {"learned": {"fallback": "lmetric", "epsilon_start": 0.1}}
    monkeypatch.setenv("LODESTAR_DISPATCHER__POLICY_PARAMS__LEARNED__EPSILON_START", "0.2")
    assert load_settings().dispatcher.policy_params == {"learned": {"fallback": "lmetric", "epsilon_start": "0.2"}}
    monkeypatch.delenv("LODESTAR_DISPATCHER__POLICY_PARAMS__LEARNED__EPSILON_START")
    monkeypatch.setenv("LODESTAR_DISPATCHER__POLICY_PARAMS", '{"lmetric": {}}')
    assert load_settings().dispatcher.policy_params == {"learned": {"fallback": "lmetric", "epsilon_start": 0.1},
                                                        "lmetric": {}}


def test_the_removed_fallback_key_says_where_it_went(config_file: Path) -> None:
    config_file.write_text("dispatcher:\n  fallback_policy: lmetric\n")
    with pytest.raises(ValueError, match="the learned policy has no heuristic fallback"):
        load_settings()
