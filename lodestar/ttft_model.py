"""Numpy evaluator of a model snapshot: predicted TTFT for every candidate at once.

The dispatcher uses this (it must not import the learner), and tests use it to check that what the
dispatcher computes equals what the learner's model predicts. One snapshot kind, `dense`, covers both
model families: a fixed input transform, standardization, then a stack of affine layers with ReLU
between them (a linear model is a stack of one), then the inverse target transform:

    z = x[:, columns];  z[:, log1p_columns] = log1p(max(z, 0))
    h = (z - x_center) * x_inv_scale
    h = relu(h @ layer{i}_w + layer{i}_b) for every layer but the last, which has no ReLU
    ttft_ms = inverse_target(h[:, 0] * target.scale + target.center + base)

where `base` is 0, or, when `target.base_feature` names a feature (a model of the residual over a prior,
e.g. the analytic estimate `ttft_estimate_ms`; log1p targets only), that feature of the row through the
forward target transform.

Arrays: `x_center`, `x_inv_scale`, `layer{i}_w` (in x out), `layer{i}_b`, and optionally
`feature_min`/`feature_max` (raw features seen in training, for the out-of-range fallback).
Meta: `layers`, `log1p_features`, `target` ({transform, center, scale}), `range_margin`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lodestar.features import column_indices
from lodestar.snapshot import Snapshot, SnapshotError

KIND_DENSE = "dense"
TARGET_TRANSFORMS = ("log1p", "identity")
# exp(25) ms is about 2 days: far beyond any TTFT, and keeps expm1 finite.
_MAX_LOG_TTFT = 25.0


def forward_target(ttft_ms: np.ndarray | float, transform: str) -> np.ndarray:
    """TTFT in ms to the space a model regresses in."""
    y = np.maximum(np.asarray(ttft_ms, dtype=np.float64), 0.0)
    return np.log1p(y) if transform == "log1p" else y


def inverse_target(z: np.ndarray | float, transform: str) -> np.ndarray:
    """A model's output back to TTFT in ms (never negative)."""
    z = np.asarray(z, dtype=np.float64)
    if transform == "log1p":
        return np.expm1(np.minimum(np.maximum(z, 0.0), _MAX_LOG_TTFT))  # a clip, without np.clip's dispatch
    return np.maximum(z, 0.0)


def transform_inputs(x: np.ndarray, log1p_mask: np.ndarray) -> np.ndarray:
    """The fixed input transform: log1p of the heavy-tailed columns (clamped at 0), others as is."""
    z = np.array(x, dtype=np.float64, copy=True)
    if log1p_mask.any():
        z[:, log1p_mask] = np.log1p(np.maximum(z[:, log1p_mask], 0.0))
    return z


class TTFTModel:
    """A decoded snapshot, ready to predict TTFT (ms) for candidate matrices built by lodestar.features."""

    def __init__(self, snapshot: Snapshot):
        if snapshot.kind != KIND_DENSE:
            raise SnapshotError(f"unsupported snapshot kind {snapshot.kind!r} (supported: {KIND_DENSE})")
        meta = snapshot.meta
        try:
            self.columns = column_indices(snapshot.feature_names)
        except KeyError as exc:
            raise SnapshotError(f"snapshot uses features this build does not compute: {exc}") from None
        n = len(snapshot.feature_names)
        log1p = meta.get("log1p_features", [])
        if not isinstance(log1p, list) or not set(log1p) <= set(snapshot.feature_names):
            raise SnapshotError("meta.log1p_features must list some of the snapshot's features")
        self.log1p_mask = np.array([name in log1p for name in snapshot.feature_names], dtype=bool)
        target = meta.get("target")
        if not isinstance(target, dict) or target.get("transform") not in TARGET_TRANSFORMS:
            raise SnapshotError(f"meta.target.transform must be one of {TARGET_TRANSFORMS}")
        self.target_transform: str = target["transform"]
        self.target_center = _number(target.get("center"), "meta.target.center")
        self.target_scale = _number(target.get("scale"), "meta.target.scale")
        self.base_column: int | None = None
        base = target.get("base_feature")
        if base is not None:
            if self.target_transform != "log1p":
                raise SnapshotError("meta.target.base_feature needs the log1p target transform")
            try:
                self.base_column = int(column_indices((base,))[0])
            except (KeyError, TypeError):
                raise SnapshotError(f"meta.target.base_feature {base!r} is not a feature this build computes") from None
        self.x_center = _vector(snapshot.arrays, "x_center", n)
        self.x_inv_scale = _vector(snapshot.arrays, "x_inv_scale", n)
        n_layers = meta.get("layers")
        if not isinstance(n_layers, int) or n_layers < 1:
            raise SnapshotError("meta.layers must be a positive integer")
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []
        width = n
        for i in range(n_layers):
            w = snapshot.arrays.get(f"layer{i}_w")
            b = snapshot.arrays.get(f"layer{i}_b")
            if w is None or b is None or w.ndim != 2 or b.ndim != 1:
                raise SnapshotError(f"layer {i}: needs 2-d layer{i}_w and 1-d layer{i}_b")
            if w.shape[0] != width or b.shape[0] != w.shape[1]:
                raise SnapshotError(f"layer {i}: shapes {w.shape} and {b.shape} do not chain from width {width}")
            self.layers.append((w.astype(np.float64), b.astype(np.float64)))
            width = w.shape[1]
        if width != 1:
            raise SnapshotError(f"the last layer must have one output, has {width}")
        self.feature_min: np.ndarray | None = None
        self.feature_max: np.ndarray | None = None
        if "feature_min" in snapshot.arrays or "feature_max" in snapshot.arrays:
            self.feature_min = _vector(snapshot.arrays, "feature_min", n)
            self.feature_max = _vector(snapshot.arrays, "feature_max", n)
        self.range_margin = _number(meta.get("range_margin", 0.25), "meta.range_margin")
        self._range_lo: np.ndarray | None = None
        self._range_hi: np.ndarray | None = None
        if self.feature_min is not None and self.feature_max is not None:
            lo = transform_inputs(self.feature_min[None, :], self.log1p_mask)[0]
            hi = transform_inputs(self.feature_max[None, :], self.log1p_mask)[0]
            slack = self.range_margin * (hi - lo)
            self._range_lo, self._range_hi = lo - slack, hi + slack
        # Fold the standardization into the first layer: (z - c) * s @ W + b = z @ (s W) + (b - (c s) @ W).
        w0, b0 = self.layers[0]
        self._w0 = self.x_inv_scale[:, None] * w0
        self._b0 = b0 - (self.x_center * self.x_inv_scale) @ w0
        self.version = snapshot.version
        self.family = snapshot.family
        self.validated = snapshot.validated
        self.meta: dict[str, Any] = dict(meta)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted TTFT in ms for each row of a (n, N_FEATURES) candidate matrix."""
        return self.predict_from(self.network_output(x), None if self.base_column is None else x[:, self.base_column])

    def predict_and_range(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`predict(x)` and `out_of_range(x)` from one transform of the rows into the model's inputs."""
        z = self._inputs(x)
        base = None if self.base_column is None else x[:, self.base_column]
        return self.predict_from(self._network(z), base), self._outside(z)

    def network_output(self, x: np.ndarray) -> np.ndarray:
        """The model's own term per row, in the target space before the base feature is added (what `predict`
        turns into TTFT with `predict_from`): a caller whose rows repeat can keep it."""
        return self._network(self._inputs(x))

    def predict_from(self, network_output: np.ndarray, base: np.ndarray | None) -> np.ndarray:
        """Predicted TTFT in ms from `network_output` and the rows' base feature (`base_column` of the
        candidate matrix; ignored when the model has none)."""
        out = network_output
        if self.base_column is not None:
            out = out + forward_target(base, self.target_transform)
        return inverse_target(out, self.target_transform)

    def out_of_range(self, x: np.ndarray) -> np.ndarray:
        """Per row: whether any feature lies outside the training range widened by the margin.

        Compared in the model's input space (log1p for the heavy-tailed features), where the margin is
        a fraction of the span: for a queue length seen up to 20, a margin of 0.25 allows up to ~45.
        """
        if self._range_lo is None or self._range_hi is None:
            return np.zeros(len(x), dtype=bool)
        return self._outside(self._inputs(x))

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        """The model's columns of the rows, through the fixed input transform (a new array)."""
        return transform_inputs(x[:, self.columns], self.log1p_mask)

    def _network(self, z: np.ndarray) -> np.ndarray:
        h = z @ self._w0 + self._b0  # the standardization is folded into the first layer
        for w, b in self.layers[1:]:
            np.maximum(h, 0.0, out=h)
            h = h @ w + b
        return h[:, 0] * self.target_scale + self.target_center

    def _outside(self, z: np.ndarray) -> np.ndarray:
        if self._range_lo is None or self._range_hi is None:
            return np.zeros(len(z), dtype=bool)
        return np.any((z < self._range_lo) | (z > self._range_hi), axis=1)


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
        raise SnapshotError(f"{name} must be a finite number")
    return float(value)


def _vector(arrays: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    a = arrays.get(name)
    if a is None or a.shape != (n,):
        raise SnapshotError(f"array {name} must have shape ({n},)")
    return a.astype(np.float64)
