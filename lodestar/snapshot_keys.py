"""Which keys sign and verify model snapshots, from the `snapshot_signing` settings, refusing unsafe ones.

A key that anyone could know makes the signature worthless: whoever can write the snapshot hash in Redis
could then make every dispatcher route by a model of their choosing. So a service that signs (the learner)
or verifies (a dispatcher with the learned policy) refuses to start with an empty key, a key shorter than
MIN_KEY_BYTES, or a key that is published (in this source, an old default or a compose placeholder) -
unless `dev_mode` is on, where such keys are accepted with a warning and an empty key becomes DEV_KEY,
which is public: for the local demo, the simulator and tests only.
"""

from __future__ import annotations

import logging

from lodestar.settings import ConfigurationError, Settings
from lodestar.snapshot import SigningKey

log = logging.getLogger(__name__)

MIN_KEY_BYTES = 32
DEV_KEY = SigningKey("dev", b"lodestar-dev-mode-only-PUBLIC-snapshot-signing-key")
PUBLISHED_KEYS = frozenset({
    DEV_KEY.secret,
    b"lodestar-dev-key-change-me",  # the default of learner.hmac_key before keys were checked
    b"change-me-in-production",  # compose.yaml's old fallback
})
GENERATE_HINT = "generate one with `openssl rand -hex 32`"
CURRENT_KEY = "snapshot_signing.key (LODESTAR_SNAPSHOT_SIGNING__KEY)"


class InsecureSigningKey(ConfigurationError):
    """A snapshot signing key is missing, short or published, and dev mode is off."""


def _problem(secret: bytes) -> str | None:
    if not secret:
        return "is not set"
    if secret in PUBLISHED_KEYS:
        return "is a published key (in Lodestar's source or examples)"
    if len(secret) < MIN_KEY_BYTES:
        return f"is {len(secret)} bytes, shorter than {MIN_KEY_BYTES}"
    return None


def _check(setting: str, secret: bytes, dev_mode: bool) -> None:
    problem = _problem(secret)
    if problem is None:
        return
    if not dev_mode:
        raise InsecureSigningKey(
            f"{setting} {problem}: a snapshot signed with a guessable key can be forged by anyone who can write "
            f"to Redis; {GENERATE_HINT} (or set dev_mode for local development only)")
    log.warning("dev mode: %s %s; model snapshots are NOT protected", setting, problem)


def signing_key(settings: Settings) -> SigningKey:
    """The key the learner signs with: snapshot_signing.key, named snapshot_signing.key_id (DEV_KEY in dev mode
    when none is set). Raises InsecureSigningKey if it is unsafe and dev mode is off."""
    cfg = settings.snapshot_signing
    secret = cfg.key.get_secret_value().encode()
    _check(CURRENT_KEY, secret, settings.dev_mode)
    return SigningKey(cfg.key_id, secret) if secret else DEV_KEY


def verification_keys(settings: Settings) -> dict[str, bytes]:
    """Key id -> key of every key a verifier accepts: the current key (as the learner's signing_key) and
    snapshot_signing.accepted_keys. Raises InsecureSigningKey if one is unsafe and dev mode is off."""
    current = signing_key(settings)
    keys = {current.key_id: current.secret}
    for key_id, value in settings.snapshot_signing.accepted_keys.items():
        secret = value.get_secret_value().encode()
        _check(f"snapshot_signing.accepted_keys.{key_id}", secret, settings.dev_mode)
        if secret:
            keys[key_id] = secret
    return keys
