"""An incremental river model: linear regression on log1p(TTFT) over standardized features.

The features are first put through the shared fixed transform (log1p of the heavy-tailed ones), then
river's running StandardScaler, then river's LinearRegression trained one sample at a time with Adam.
In log space a linear model is a power law over the physics features (uncached tokens per unit of GPU
speed, prefill backlog per unit of speed, ...), which is how TTFT scales. The snapshot is the scaler's
means and 1/std plus the weights, so the dispatcher's numpy reproduces river's predictions exactly.
"""

from __future__ import annotations

import collections
import math
from typing import Annotated, Any

import numpy as np
from pydantic import Field
from river import linear_model, optim, preprocessing, utils

from learner.models.base import InputLayout
from lodestar.snapshot import Snapshot
from lodestar.ttft_model import KIND_DENSE, forward_target, inverse_target, transform_inputs

TARGET = "log1p"


class RiverLinearModel:
    """River StandardScaler + LinearRegression(Adam) on log1p(TTFT); learns from every sample."""

    family = "river"
    incremental = True

    def __init__(
        self,
        layout: InputLayout | None = None,
        lr: Annotated[float, Field(gt=0, description="Adam learning rate of the weights")] = 0.01,
        intercept_lr: Annotated[float, Field(ge=0, description="learning rate of the intercept")] = 0.05,
        l2: Annotated[float, Field(ge=0, description="L2 penalty on the weights")] = 0.0,
    ):
        self.layout = layout or InputLayout()
        self.lr = lr
        self.intercept_lr = intercept_lr
        self.l2 = l2
        self._columns = self.layout.columns
        self._log1p_mask = self.layout.log1p_mask
        self.scaler = preprocessing.StandardScaler()
        self.regressor = linear_model.LinearRegression(
            optimizer=optim.Adam(lr), intercept_lr=intercept_lr, l2=l2
        )
        self.n_learned = 0

    @property
    def trained(self) -> bool:
        return self.n_learned > 0

    def _as_dicts(self, x: np.ndarray) -> list[dict[str, float]]:
        z = transform_inputs(np.atleast_2d(x)[:, self._columns], self._log1p_mask)
        names = self.layout.feature_names
        return [dict(zip(names, row, strict=True)) for row in z.tolist()]

    def learn_one(self, x_row: np.ndarray, ttft_ms: float) -> None:
        """Update the scaler with the sample, then take one Adam step on it."""
        (d,) = self._as_dicts(x_row)
        self.scaler.learn_one(d)
        self.regressor.learn_one(self.scaler.transform_one(d), float(forward_target(ttft_ms, TARGET)))
        self.n_learned += 1

    def learn_many(self, x_rows: np.ndarray, ttft_ms: np.ndarray) -> None:
        """Learn from the rows in order, one at a time (the same as repeated learn_one)."""
        for row, y in zip(np.atleast_2d(x_rows), np.asarray(ttft_ms, dtype=np.float64), strict=True):
            self.learn_one(row, float(y))

    def predict(self, x: np.ndarray) -> np.ndarray:
        """River's own predictions (scaler, then linear model), mapped back to ms."""
        z = [self.regressor.predict_one(self.scaler.transform_one(d)) for d in self._as_dicts(x)]
        return inverse_target(np.array(z, dtype=np.float64), TARGET)

    def to_snapshot(self, version: int) -> Snapshot:
        """Scaler means and inverse stds, the weights as a one-layer dense stack, and the intercept."""
        names = self.layout.feature_names
        means = np.array([self.scaler.means.get(n, 0.0) for n in names], dtype=np.float64)
        var = [self.scaler.vars.get(n, 0.0) for n in names]
        # river's transform maps a zero-variance feature to 0, which inv_scale = 0 reproduces.
        inv_scale = np.array([1.0 / v**0.5 if v else 0.0 for v in var], dtype=np.float64)
        weights = self.regressor.weights
        w = np.array([[weights.get(n, 0.0)] for n in names], dtype=np.float64)
        arrays = {
            "x_center": means,
            "x_inv_scale": inv_scale,
            "layer0_w": w,
            "layer0_b": np.array([float(self.regressor.intercept)]),
        }
        meta = {
            "layers": 1,
            "log1p_features": list(self.layout.log1p_features),
            "target": {"transform": TARGET, "center": 0.0, "scale": 1.0},
        }
        return Snapshot(version, self.family, KIND_DENSE, names, arrays, meta)

    def state_dict(self) -> dict[str, Any]:
        opt = self.regressor.optimizer
        return {
            "family": self.family,
            "layout": self.layout.to_dict(),
            "params": {"lr": self.lr, "intercept_lr": self.intercept_lr, "l2": self.l2},
            "n_learned": self.n_learned,
            "scaler": {
                "counts": dict(self.scaler.counts),
                "means": dict(self.scaler.means),
                "vars": dict(self.scaler.vars),
            },
            "weights": self.regressor.weights,
            "intercept": float(self.regressor.intercept),
            "adam": {
                "n_iterations": opt.n_iterations,
                "m": None if opt.m is None else _plain(opt.m),
                "v": None if opt.v is None else _plain(opt.v),
            },
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RiverLinearModel:
        model = cls(InputLayout.from_dict(state["layout"]), **state["params"])
        model.n_learned = int(state["n_learned"])
        sc = state["scaler"]
        model.scaler.counts = collections.Counter({k: int(v) for k, v in sc["counts"].items()})
        model.scaler.means = collections.defaultdict(float, sc["means"])
        model.scaler.vars = collections.defaultdict(float, sc["vars"])
        model.regressor._weights = utils.VectorDict(dict(state["weights"]))
        model.regressor.intercept = float(state["intercept"])
        opt = model.regressor.optimizer
        adam = state["adam"]
        opt.n_iterations = int(adam["n_iterations"])
        if adam["m"] is not None:
            # learn_one steps with VectorDict weights and gradients, so Adam keeps VectorDict moments.
            opt.m = utils.VectorDict(dict(adam["m"]))
            opt.v = utils.VectorDict(dict(adam["v"]))
        if not all(math.isfinite(v) for v in model.regressor.weights.values()):
            raise ValueError("river model state has non-finite weights")
        return model


def _plain(d: utils.VectorDict | dict[str, float]) -> dict[str, float]:
    return d.to_dict() if isinstance(d, utils.VectorDict) else dict(d)
