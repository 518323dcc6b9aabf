"""Ridge regression of the analytic prior's log error: TTFT = prior x exp(w . z(x) + b).

The correction the `learned` policy applies to the calibrated engine model's estimate
(`ttft_estimate_ms`): a linear model, in log space, of log1p(TTFT) - log1p(prior) on the standardized
transformed features (log1p of the heavy-tailed ones, the prior among them, so a scale-dependent error is
a slope). A few dozen parameters fitted in closed form: it cannot overfit the noise of single TTFTs the
way a network trained for hundreds of steps on a small replay does (in the simulator a 2x64 MLP residual
stayed worse than the prior on held-out data, this one beat it from ~300 samples on), and a refit follows
the current regime at once (no warm start to unlearn).

`learn_many` refits on the batch it is given (the trainer passes its replay); `learn_one` adds one sample
to the sufficient statistics of the current fit. The snapshot is a one-layer `dense` snapshot whose target
names the prior as its base feature (lodestar/ttft_model.py adds it back).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
from pydantic import AfterValidator, Field

from learner.models.base import InputLayout
from lodestar.features import ESTIMATE_FEATURE, FEATURE_INDEX, GPU_FEATURES, HEAVY_TAILED, column_indices
from lodestar.snapshot import Snapshot, decode_array, encode_array
from lodestar.ttft_model import KIND_DENSE, forward_target, inverse_target, transform_inputs

TARGET = "log1p"


def _known_feature(name: str) -> str:
    if name not in FEATURE_INDEX:
        raise ValueError(f"unknown feature {name!r}")
    return name


class RidgeResidualModel:
    """Closed-form ridge on the log ratio of observed TTFT to a prior feature."""

    family = "ridge_residual"
    incremental = False

    def __init__(
        self,
        layout: InputLayout | None = None,
        residual_feature: Annotated[str, AfterValidator(_known_feature), Field(
            description="the prior whose log error is modelled (a feature name)")] = ESTIMATE_FEATURE,
        l2: Annotated[float, Field(gt=0, description="ridge penalty, relative to the sample count")] = 0.01,
        features: Annotated[tuple[Annotated[str, AfterValidator(_known_feature)], ...] | None, Field(description=(
            "the features the correction reads (none: every feature). The default is the GPU type's figures "
            "only: a per-GPU-type bias of the prior. A correction that reads the prior itself or a load "
            "feature re-ranks the candidates badly (docs/learning.md)"))] = GPU_FEATURES,
        seed: int = 0,
    ):
        if l2 <= 0:
            raise ValueError("l2 must be positive")
        if features is not None:
            layout = InputLayout(tuple(features), HEAVY_TAILED)
        self.layout = layout or InputLayout()
        self.residual_feature = residual_feature
        self.l2 = l2
        self.seed = seed  # accepted for a uniform constructor; the fit is deterministic
        self._columns = self.layout.columns
        self._log1p_mask = self.layout.log1p_mask
        self._base_column = int(column_indices((residual_feature,))[0])
        k = len(self.layout.feature_names)
        self.x_center = np.zeros(k)
        self.x_inv_scale = np.zeros(k)
        self.weights = np.zeros(k)
        self.t_mean = 0.0
        # Sufficient statistics of the current fit, in standardized space (for learn_one).
        self._hh = np.zeros((k, k))
        self._ht = np.zeros(k)
        self._h_sum = np.zeros(k)
        self._t_sum = 0.0
        self._n = 0
        self.n_learned = 0

    @property
    def trained(self) -> bool:
        return self.n_learned > 0

    def _standardized(self, x: np.ndarray) -> np.ndarray:
        z = transform_inputs(np.atleast_2d(x)[:, self._columns], self._log1p_mask)
        return (z - self.x_center) * self.x_inv_scale

    def _residual_target(self, x: np.ndarray, ttft_ms: np.ndarray) -> np.ndarray:
        base = np.atleast_2d(x)[:, self._base_column]
        return forward_target(ttft_ms, TARGET) - forward_target(base, TARGET)

    def _solve(self) -> None:
        """Ridge weights and an unpenalized intercept from the normal equations of the statistics."""
        k = len(self._ht)
        n = max(self._n, 1)
        a = np.empty((k + 1, k + 1))
        a[:k, :k] = self._hh + self.l2 * n * np.eye(k)
        a[:k, k] = a[k, :k] = self._h_sum
        a[k, k] = n
        solution = np.linalg.solve(a, np.append(self._ht, self._t_sum))
        self.weights, self.t_mean = solution[:k], float(solution[k])

    def learn_many(self, x_rows: np.ndarray, ttft_ms: np.ndarray) -> None:
        """Refit on this batch: standardization from it, then the ridge solution."""
        x_rows = np.atleast_2d(x_rows)
        if len(x_rows) == 0:
            return
        t = self._residual_target(x_rows, np.asarray(ttft_ms, dtype=np.float64))
        z = transform_inputs(x_rows[:, self._columns], self._log1p_mask)
        std = z.std(axis=0)
        self.x_center = z.mean(axis=0)
        self.x_inv_scale = np.where(std > 1e-9, 1.0 / np.maximum(std, 1e-9), 0.0)
        h = (z - self.x_center) * self.x_inv_scale
        self._hh = h.T @ h
        self._ht = h.T @ t
        self._h_sum = h.sum(axis=0)
        self._t_sum = float(t.sum())
        self._n = len(t)
        self._solve()
        self.n_learned += len(t)

    def learn_one(self, x_row: np.ndarray, ttft_ms: float) -> None:
        """Add one sample to the current fit (the first sample also fixes the standardization)."""
        if not self.trained:
            self.learn_many(np.atleast_2d(x_row), np.array([ttft_ms]))
            return
        h = self._standardized(x_row)[0]
        t = float(self._residual_target(np.atleast_2d(x_row), np.array([ttft_ms]))[0])
        self._hh += np.outer(h, h)
        self._ht += h * t
        self._h_sum = self._h_sum + h
        self._t_sum += t
        self._n += 1
        self._solve()
        self.n_learned += 1

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted TTFT in ms per row: the prior times the learned correction."""
        x = np.atleast_2d(x)
        out = self._standardized(x) @ self.weights + self.t_mean
        return inverse_target(out + forward_target(x[:, self._base_column], TARGET), TARGET)

    def to_snapshot(self, version: int) -> Snapshot:
        """One affine layer over the standardized inputs; the prior is added back by the evaluator."""
        arrays = {"x_center": self.x_center.copy(), "x_inv_scale": self.x_inv_scale.copy(),
                  "layer0_w": self.weights[:, None].copy(), "layer0_b": np.zeros(1)}
        meta = {
            "layers": 1,
            "log1p_features": list(self.layout.log1p_features),
            "target": {"transform": TARGET, "center": self.t_mean, "scale": 1.0,
                       "base_feature": self.residual_feature},
        }
        return Snapshot(version, self.family, KIND_DENSE, self.layout.feature_names, arrays, meta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "layout": self.layout.to_dict(),
            "params": {"residual_feature": self.residual_feature, "l2": self.l2, "features": None,  # the layout says
                       "seed": self.seed},
            "n_learned": self.n_learned,
            "x_center": encode_array(self.x_center),
            "x_inv_scale": encode_array(self.x_inv_scale),
            "weights": encode_array(self.weights),
            "t_mean": self.t_mean,
            "hh": encode_array(self._hh),
            "ht": encode_array(self._ht),
            "h_sum": encode_array(self._h_sum),
            "t_sum": self._t_sum,
            "n": self._n,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RidgeResidualModel:
        model = cls(InputLayout.from_dict(state["layout"]), **state["params"])
        model.n_learned = int(state["n_learned"])
        model.x_center = decode_array(state["x_center"], "x_center")
        model.x_inv_scale = decode_array(state["x_inv_scale"], "x_inv_scale")
        model.weights = decode_array(state["weights"], "weights")
        model.t_mean = float(state["t_mean"])
        k = len(model.weights)
        model._hh = decode_array(state["hh"], "hh").reshape(k, k)
        model._ht = decode_array(state["ht"], "ht")
        model._h_sum = decode_array(state["h_sum"], "h_sum")
        model._t_sum = float(state["t_sum"])
        model._n = int(state["n"])
        return model
