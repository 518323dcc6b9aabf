"""The model snapshot codec: a plain numeric format, signed and versioned. Never pickle.

A snapshot is named float arrays plus JSON metadata. On the wire it is one UTF-8 JSON envelope:

    {"format": "lodestar.snapshot", "format_version": 2, "key_id": "<id of the signing key>",
     "body": "<JSON text of the snapshot>", "signature": "<hex HMAC-SHA256 of key_id, LF, body>"}

The body holds `version`, `family`, `kind`, `feature_names`, `meta` and `arrays`, each array as
`{"dtype": "<f8" | "<i8", "shape": [...], "data": "<base64 of little-endian bytes>"}`. `decode`
looks the key id up among the keys it accepts (several during a key rotation), checks the signature
(constant-time compare) and only then parses and validates the body, so bytes that were not signed
with an accepted key never reach the JSON parser's consumers. The key id is signed with the body.
What a `kind` means numerically is defined by its evaluator (lodestar/ttft_model.py).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

FORMAT = "lodestar.snapshot"
FORMAT_VERSION = 2  # 2: the envelope names its signing key (key_id); 1 had none and is refused
KEY_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_ENVELOPE_KEYS = {"format", "format_version", "key_id", "body", "signature"}
_DTYPES = {"<f8": np.dtype("<f8"), "<i8": np.dtype("<i8")}


class SnapshotError(ValueError):
    """A snapshot could not be decoded: bad signature, bad format or an invalid body."""


@dataclass(frozen=True)
class SigningKey:
    """An HMAC key and the id snapshots signed with it carry (lodestar.snapshot_keys checks its strength)."""

    key_id: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not KEY_ID_PATTERN.fullmatch(self.key_id):
            raise SnapshotError(f"key id {self.key_id!r} is not 1-64 of [A-Za-z0-9._-]")
        if not self.secret:
            raise SnapshotError(f"signing key {self.key_id!r} is empty")


@dataclass(frozen=True)
class Snapshot:
    """A trained model as numbers: what the dispatcher evaluates with numpy."""

    version: int
    family: str
    kind: str
    feature_names: tuple[str, ...]
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def validated(self) -> bool:
        """Whether the learner validated this model on held-out telemetry."""
        return bool(self.meta.get("validated", False))


def encode_array(a: np.ndarray) -> dict[str, Any]:
    """A numeric array as JSON-able `{dtype, shape, data}` (little-endian, base64)."""
    arr = np.asarray(a)
    if arr.dtype.kind == "f":
        arr = arr.astype("<f8", copy=False)
    elif arr.dtype.kind in "iub":
        arr = arr.astype("<i8", copy=False)
    else:
        raise SnapshotError(f"unsupported array dtype {arr.dtype}")
    return {
        "dtype": arr.dtype.str,
        "shape": list(arr.shape),
        "data": base64.b64encode(np.ascontiguousarray(arr).tobytes()).decode("ascii"),
    }


def decode_array(obj: Any, name: str = "array") -> np.ndarray:
    """The inverse of `encode_array`, validating dtype, shape and length (and finiteness of floats)."""
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise SnapshotError(f"{name}: expected an object with dtype, shape and data")
    dtype = _DTYPES.get(obj["dtype"]) if isinstance(obj["dtype"], str) else None
    if dtype is None:
        raise SnapshotError(f"{name}: unsupported dtype {obj['dtype']!r}")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise SnapshotError(f"{name}: shape must be a list of non-negative integers")
    if not isinstance(obj["data"], str):
        raise SnapshotError(f"{name}: data must be a base64 string")
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except ValueError as exc:
        raise SnapshotError(f"{name}: data is not valid base64") from exc
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise SnapshotError(f"{name}: {len(raw)} bytes for shape {shape} of {dtype.str}")
    arr = np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if dtype.kind == "f" and not np.all(np.isfinite(arr)):
        raise SnapshotError(f"{name}: contains NaN or infinity")
    return arr


def _signature(key_id: str, body: bytes, secret: bytes) -> str:
    return hmac.new(secret, key_id.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def encode(snapshot: Snapshot, key: SigningKey) -> bytes:
    """Serialize `snapshot` and sign it with `key` (the learner's current key), naming the key in the envelope."""
    body = {
        "version": int(snapshot.version),
        "family": snapshot.family,
        "kind": snapshot.kind,
        "feature_names": list(snapshot.feature_names),
        "meta": snapshot.meta,
        "arrays": {name: encode_array(a) for name, a in sorted(snapshot.arrays.items())},
    }
    try:
        body_text = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot meta is not plain finite JSON: {exc}") from exc
    envelope = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "key_id": key.key_id,
        "body": body_text,
        "signature": _signature(key.key_id, body_text.encode(), key.secret),
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def _reject_constant(token: str) -> float:
    raise SnapshotError(f"non-finite number {token} in snapshot")


def decode(raw: bytes | str, keys: Mapping[str, bytes]) -> Snapshot:
    """Verify the signature under the accepted key its envelope names (`keys`: key id -> secret), then parse
    and validate; raises SnapshotError with a clear reason."""
    try:
        envelope = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SnapshotError(f"snapshot envelope is not JSON: {exc}") from exc
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT:
        raise SnapshotError(f"not a {FORMAT} envelope")
    if envelope.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(
            f"unsupported snapshot format_version {envelope.get('format_version')!r} (expected {FORMAT_VERSION}; "
            "a learner of this version republishes in it)"
        )
    if set(envelope) != _ENVELOPE_KEYS:
        raise SnapshotError(f"snapshot envelope must have exactly {sorted(_ENVELOPE_KEYS)}, got {sorted(envelope)}")
    key_id, body_text, signature = envelope["key_id"], envelope["body"], envelope["signature"]
    if not isinstance(key_id, str) or not isinstance(body_text, str) or not isinstance(signature, str):
        raise SnapshotError("snapshot key_id, body and signature must be strings")
    secret = keys.get(key_id)
    if secret is None:
        raise SnapshotError(f"snapshot signed with key id {key_id[:64]!r}, which is not among the accepted keys "
                            f"({', '.join(sorted(keys)) or 'none'})")
    if not hmac.compare_digest(_signature(key_id, body_text.encode(), secret), signature):
        raise SnapshotError(f"snapshot signature does not match key {key_id!r} (wrong key or tampered payload)")
    try:
        body = json.loads(body_text, parse_constant=_reject_constant)
    except ValueError as exc:
        raise SnapshotError(f"snapshot body is not JSON: {exc}") from exc
    return _validate_body(body)


def _validate_body(body: Any) -> Snapshot:
    expected = {"version", "family", "kind", "feature_names", "meta", "arrays"}
    if not isinstance(body, dict) or set(body) != expected:
        got = sorted(body) if isinstance(body, dict) else type(body).__name__
        raise SnapshotError(f"snapshot body must have exactly {sorted(expected)}, got {got}")
    version = body["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise SnapshotError("snapshot version must be a non-negative integer")
    for name in ("family", "kind"):
        if not isinstance(body[name], str) or not body[name]:
            raise SnapshotError(f"snapshot {name} must be a non-empty string")
    names = body["feature_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise SnapshotError("snapshot feature_names must be a non-empty list of strings")
    if len(set(names)) != len(names):
        raise SnapshotError("snapshot feature_names has duplicates")
    if not isinstance(body["meta"], dict):
        raise SnapshotError("snapshot meta must be an object")
    if not isinstance(body["arrays"], dict):
        raise SnapshotError("snapshot arrays must be an object")
    arrays = {str(k): decode_array(v, f"arrays.{k}") for k, v in body["arrays"].items()}
    return Snapshot(version, body["family"], body["kind"], tuple(names), arrays, body["meta"])
