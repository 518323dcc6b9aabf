"""Snapshot signing keys from the settings: unsafe keys are refused at start unless dev mode is on."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lodestar.settings import PROJECT_ROOT, ConfigurationError, Settings, load_settings
from lodestar.snapshot_keys import DEV_KEY, MIN_KEY_BYTES, InsecureSigningKey, signing_key, verification_keys

STRONG = "0123456789abcdef" * 4  # 64 bytes, e.g. `openssl rand -hex 32`


def settings(dev_mode: bool = False, **signing: object) -> Settings:
    return Settings(dev_mode=dev_mode, snapshot_signing=signing)


@pytest.mark.parametrize(("key", "reason"), [
    ("", "is not set"),
    ("x" * (MIN_KEY_BYTES - 1), f"is {MIN_KEY_BYTES - 1} bytes, shorter than {MIN_KEY_BYTES}"),
    ("lodestar-dev-key-change-me", "published"),  # the old built-in default
    ("change-me-in-production", "published"),  # compose's old fallback
    (DEV_KEY.secret.decode(), "published"),  # long enough, but in the source
])
def test_unsafe_keys_are_refused_with_a_clear_error(key: str, reason: str) -> None:
    for role in (signing_key, verification_keys):
        with pytest.raises(InsecureSigningKey, match=reason) as caught:
            role(settings(key=key))
        message = str(caught.value)
        assert "LODESTAR_SNAPSHOT_SIGNING__KEY" in message and "openssl rand -hex 32" in message
        assert not key or key not in message  # the error never echoes the key


def test_an_unsafe_accepted_key_is_refused_too() -> None:
    with pytest.raises(InsecureSigningKey, match=r"accepted_keys.old is 5 bytes"):
        verification_keys(settings(key=STRONG, accepted_keys={"old": "short"}))


def test_a_strong_key_signs_under_its_id_and_verifies_with_the_accepted_ones() -> None:
    s = settings(key=STRONG, key_id="2025-06", accepted_keys={"2025-05": "p" * 40})
    key = signing_key(s)
    assert (key.key_id, key.secret) == ("2025-06", STRONG.encode())
    assert verification_keys(s) == {"2025-06": STRONG.encode(), "2025-05": b"p" * 40}


def test_dev_mode_accepts_weak_keys_loudly_and_falls_back_to_the_public_dev_key(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="lodestar.snapshot_keys"):
        assert signing_key(settings(dev_mode=True)) == DEV_KEY
        assert verification_keys(settings(dev_mode=True)) == {DEV_KEY.key_id: DEV_KEY.secret}
        assert signing_key(settings(dev_mode=True, key="short")).secret == b"short"
    assert "NOT protected" in caplog.text


def test_dev_mode_is_off_unless_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LODESTAR_DEV_MODE", raising=False)
    assert Settings().dev_mode is False
    assert Settings().snapshot_signing.key.get_secret_value() == ""  # no usable default key
    monkeypatch.setenv("LODESTAR_DEV_MODE", "true")
    assert Settings().dev_mode is True


def test_the_current_key_id_cannot_name_another_accepted_key() -> None:
    with pytest.raises(ConfigurationError, match="current key_id with a different key"):
        load_settings(snapshot_signing={"key": STRONG, "key_id": "a", "accepted_keys": {"a": "b" * 40}})


def test_keys_never_show_in_the_settings_repr() -> None:
    s = settings(key=STRONG, accepted_keys={"old": "p" * 40})
    assert STRONG not in repr(s) and "p" * 40 not in repr(s)


def test_the_learner_command_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LODESTAR_")}
    env["LODESTAR_CONFIG"] = str(tmp_path / "absent.yaml")
    done = subprocess.run([sys.executable, "-m", "app.cli", "learner", "--checkpoint-path", str(tmp_path / "c.json")],
                          env=env, capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert done.returncode == 2, done.stderr
    assert "snapshot_signing.key (LODESTAR_SNAPSHOT_SIGNING__KEY) is not set" in done.stderr
    assert "Traceback" not in done.stderr


async def test_only_a_dispatcher_that_evaluates_snapshots_needs_the_key() -> None:
    from dispatcher.service import Dispatcher

    heuristic = Dispatcher(Settings(dispatcher={"policy": "least_request"}))
    assert heuristic.snapshots is None
    with pytest.raises(InsecureSigningKey):
        Dispatcher(Settings(dispatcher={"policy": "learned"}))
    learned = Dispatcher(Settings(dispatcher={"policy": "learned"}, snapshot_signing={"key": STRONG}))
    assert learned.snapshots is not None
    for made in (heuristic, learned):  # constructed, never started: close what the constructor opened
        await made.redis.aclose()
        await made.producer.stop()
        await made.consumer.stop()
