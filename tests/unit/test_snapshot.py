"""The snapshot codec: round trip, signature and schema checks, no way to smuggle non-numeric data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lodestar import snapshot as codec
from lodestar.snapshot import SigningKey, Snapshot, SnapshotError

KEY = SigningKey("k1", b"test-key-" + b"x" * 32)
KEYS = {KEY.key_id: KEY.secret}


def make_snapshot() -> Snapshot:
    return Snapshot(
        version=7,
        family="mlp",
        kind="dense",
        feature_names=("prompt_tokens", "gpu_speed"),
        arrays={"w": np.arange(6, dtype=np.float64).reshape(2, 3) / 7.0, "idx": np.array([3, -1, 2])},
        meta={"validated": True, "holdout": {"log_mae": 0.12}},
    )


def test_round_trip_is_exact() -> None:
    snap = make_snapshot()
    back = codec.decode(codec.encode(snap, KEY), KEYS)
    assert back.version == 7 and back.family == "mlp" and back.kind == "dense"
    assert back.feature_names == snap.feature_names
    assert back.meta == snap.meta and back.validated
    np.testing.assert_array_equal(back.arrays["w"], snap.arrays["w"])
    assert back.arrays["idx"].dtype == np.int64
    np.testing.assert_array_equal(back.arrays["idx"], [3, -1, 2])


def test_wrong_key_is_rejected() -> None:
    raw = codec.encode(make_snapshot(), KEY)
    with pytest.raises(SnapshotError, match="signature"):
        codec.decode(raw, {"k1": b"another-key"})


def test_tampered_body_is_rejected() -> None:
    envelope = json.loads(codec.encode(make_snapshot(), KEY))
    body = json.loads(envelope["body"])
    body["meta"]["validated"] = False
    envelope["body"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    with pytest.raises(SnapshotError, match="signature"):
        codec.decode(json.dumps(envelope).encode(), KEYS)


def test_tampered_signature_is_rejected() -> None:
    envelope = json.loads(codec.encode(make_snapshot(), KEY))
    sig = envelope["signature"]
    envelope["signature"] = ("0" if sig[0] != "0" else "1") + sig[1:]
    with pytest.raises(SnapshotError, match="signature"):
        codec.decode(json.dumps(envelope).encode(), KEYS)


def resign(body: dict) -> bytes:
    """A correctly signed envelope around an arbitrary body (what a key holder could produce)."""
    text = json.dumps(body)
    return json.dumps({"format": codec.FORMAT, "format_version": codec.FORMAT_VERSION, "key_id": KEY.key_id,
                       "body": text, "signature": codec._signature(KEY.key_id, text.encode(), KEY.secret)}).encode()


def valid_body() -> dict:
    return json.loads(json.loads(codec.encode(make_snapshot(), KEY))["body"])


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b.pop("arrays"), "exactly"),
        (lambda b: b.update(version=-1), "version"),
        (lambda b: b.update(version="7"), "version"),
        (lambda b: b.update(feature_names=[]), "feature_names"),
        (lambda b: b.update(feature_names=["a", "a"]), "duplicates"),
        (lambda b: b["arrays"]["w"].update(dtype="|O"), "dtype"),
        (lambda b: b["arrays"]["w"].update(shape=[5, 5]), "bytes for shape"),
        (lambda b: b["arrays"]["w"].update(data="%%%"), "base64"),
    ],
)
def test_invalid_bodies_are_rejected_with_a_reason(mutate, reason: str) -> None:
    body = valid_body()
    mutate(body)
    with pytest.raises(SnapshotError, match=reason):
        codec.decode(resign(body), KEYS)


def test_non_finite_arrays_are_rejected() -> None:
    body = valid_body()
    body["arrays"]["w"] = codec.encode_array(np.array([1.0, np.nan]))
    with pytest.raises(SnapshotError, match="NaN"):
        codec.decode(resign(body), KEYS)


def test_wrong_format_version_is_rejected() -> None:
    envelope = json.loads(codec.encode(make_snapshot(), KEY))
    envelope["format_version"] = 99
    with pytest.raises(SnapshotError, match="format_version"):
        codec.decode(json.dumps(envelope).encode(), KEYS)


def test_garbage_and_pickle_bytes_are_rejected() -> None:
    import pickle

    for raw in (b"not json", pickle.dumps({"version": 1}), b"[]"):
        with pytest.raises(SnapshotError):
            codec.decode(raw, KEYS)


def test_meta_must_be_plain_json() -> None:
    snap = make_snapshot()
    bad = Snapshot(snap.version, snap.family, snap.kind, snap.feature_names, snap.arrays, {"x": float("inf")})
    with pytest.raises(SnapshotError, match="JSON"):
        codec.encode(bad, KEY)


def test_the_envelope_names_its_key_and_the_verifier_picks_that_key() -> None:
    old, new = SigningKey("2025-01", b"o" * 32), SigningKey("2025-02", b"n" * 32)
    accepted = {old.key_id: old.secret, new.key_id: new.secret}  # a dispatcher during a rotation
    for key in (old, new):
        raw = codec.encode(make_snapshot(), key)
        assert json.loads(raw)["key_id"] == key.key_id
        assert codec.decode(raw, accepted).version == 7


def test_a_key_id_the_verifier_does_not_accept_is_rejected() -> None:
    raw = codec.encode(make_snapshot(), SigningKey("retired", b"r" * 32))
    with pytest.raises(SnapshotError, match="key id 'retired', which is not among the accepted keys \\(k1\\)"):
        codec.decode(raw, KEYS)


def test_the_key_id_is_signed_so_it_cannot_be_swapped() -> None:
    # Relabelling a snapshot with another accepted key's id breaks the signature, even if both keys are held.
    envelope = json.loads(codec.encode(make_snapshot(), KEY))
    envelope["key_id"] = "k2"
    with pytest.raises(SnapshotError, match="signature"):
        codec.decode(json.dumps(envelope).encode(), {**KEYS, "k2": KEY.secret})


def test_a_format_1_envelope_without_a_key_id_is_refused() -> None:
    envelope = json.loads(codec.encode(make_snapshot(), KEY))
    del envelope["key_id"]
    envelope["format_version"] = 1
    with pytest.raises(SnapshotError, match="format_version 1"):
        codec.decode(json.dumps(envelope).encode(), KEYS)


def test_extra_envelope_fields_are_refused() -> None:
    envelope = json.loads(codec.encode(make_snapshot(), KEY))
    envelope["algorithm"] = "none"
    with pytest.raises(SnapshotError, match="exactly"):
        codec.decode(json.dumps(envelope).encode(), KEYS)


@pytest.mark.parametrize(("key_id", "secret", "reason"), [("", b"k" * 32, "key id"), ("a b", b"k" * 32, "key id"),
                                                          ("k", b"", "empty")])
def test_a_signing_key_needs_an_id_and_a_secret(key_id: str, secret: bytes, reason: str) -> None:
    with pytest.raises(SnapshotError, match=reason):
        SigningKey(key_id, secret)


def test_a_signing_key_never_shows_its_secret() -> None:
    assert "xxxx" not in repr(SigningKey("k", b"x" * 32))
