"""`lodestar up` runs under settings of its own: a private namespace and, unless configured, its own key."""

from __future__ import annotations

from pathlib import Path

from app.demo import namespaced
from lodestar.settings import Settings
from lodestar.snapshot_keys import signing_key, verification_keys


def test_a_run_without_a_configured_key_signs_with_a_strong_key_of_its_own(tmp_path: Path) -> None:
    one, two = (namespaced(Settings(dev_mode=False), ns, tmp_path) for ns in ("up1", "up2"))
    assert not one.dev_mode
    key = signing_key(one)  # accepted outside dev mode: a real key
    assert key.key_id == "up1" and len(key.secret) == 64
    assert verification_keys(one) == {"up1": key.secret}
    assert signing_key(two).secret != key.secret


def test_a_configured_key_is_kept(tmp_path: Path) -> None:
    configured = Settings(snapshot_signing={"key_id": "prod-7", "key": "k" * 40})
    assert namespaced(configured, "up3", tmp_path).snapshot_signing == configured.snapshot_signing
