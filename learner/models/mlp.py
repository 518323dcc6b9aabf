"""A small MLP on log1p(TTFT), trained with Adam on replayed samples, as the Lodestar paper does.

Numpy only (2 cores, no torch): ReLU hidden layers, mean-squared error on the standardized target,
mini-batch Adam, warm-started across retrains. The input and target standardization is refit on every
training call from that call's data; the network is reparametrized so that its function is unchanged
by the refit (first layer absorbs the new input scale, last layer the new target scale), so fine-tuning
continues from where it was instead of from a function that just moved.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from functools import cache
from typing import Annotated, Any

import numpy as np
from pydantic import Field
from threadpoolctl import ThreadpoolController

from learner.models.base import InputLayout
from lodestar.snapshot import Snapshot, decode_array, encode_array
from lodestar.ttft_model import KIND_DENSE, forward_target, inverse_target, transform_inputs

TARGET = "log1p"


@cache
def _blas() -> ThreadpoolController:
    return ThreadpoolController()


def single_threaded_blas() -> AbstractContextManager[object]:
    """BLAS on one thread: for these small matrices, OpenBLAS threads only contend (2 shared cores)."""
    return _blas().limit(limits=1, user_api="blas")


class MLPModel:
    """Fully connected ReLU network over standardized transformed features; retrained on batches."""

    family = "mlp"
    incremental = False

    def __init__(
        self,
        layout: InputLayout | None = None,
        hidden: Annotated[tuple[Annotated[int, Field(ge=1)], ...], Field(
            min_length=1, description="width of each hidden ReLU layer")] = (64, 64),
        lr: Annotated[float, Field(gt=0, description="Adam learning rate")] = 2e-3,
        epochs: Annotated[int, Field(ge=1, description="passes over the training set per retrain")] = 4,
        min_steps: Annotated[int, Field(ge=0, description="at least this many Adam steps per retrain (more "
                                                          "passes on small sets)")] = 300,
        batch_size: Annotated[int, Field(ge=1, description="samples per Adam step")] = 128,
        l2: Annotated[float, Field(ge=0, description="L2 penalty on the weights")] = 1e-5,
        seed: int = 0,
    ):
        self.layout = layout or InputLayout()
        self.hidden = tuple(int(h) for h in hidden)
        self.lr = lr
        self.epochs = epochs
        self.min_steps = min_steps
        self.batch_size = batch_size
        self.l2 = l2
        self.seed = seed
        self._columns = self.layout.columns
        self._log1p_mask = self.layout.log1p_mask
        self.rng = np.random.default_rng(seed)
        n_in = len(self.layout.feature_names)
        sizes = (n_in, *self.hidden, 1)
        self.weights: list[np.ndarray] = []
        self.biases: list[np.ndarray] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            scale = np.sqrt(2.0 / a) if i < len(sizes) - 2 else np.sqrt(1.0 / a)
            self.weights.append(self.rng.normal(0.0, scale, size=(a, b)))
            self.biases.append(np.zeros(b))
        self.x_center = np.zeros(n_in)
        self.x_inv_scale = np.ones(n_in)
        self.y_center = 0.0
        self.y_scale = 1.0
        self.adam_t = 0
        self.adam_m = [np.zeros_like(p) for p in self._params()]
        self.adam_v = [np.zeros_like(p) for p in self._params()]
        self.n_learned = 0

    @property
    def trained(self) -> bool:
        return self.n_learned > 0

    def _params(self) -> list[np.ndarray]:
        return [*self.weights, *self.biases]

    def _inputs(self, x: np.ndarray) -> np.ndarray:
        return transform_inputs(np.atleast_2d(x)[:, self._columns], self._log1p_mask)

    def _forward(self, h: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Network output on standardized inputs, and each layer's input (for backprop)."""
        acts = [h]
        last = len(self.weights) - 1
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < last:
                h = np.maximum(h, 0.0)
                acts.append(h)
        return h[:, 0], acts

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted TTFT in ms per row."""
        with single_threaded_blas():
            out, _ = self._forward((self._inputs(x) - self.x_center) * self.x_inv_scale)
        return inverse_target(out * self.y_scale + self.y_center, TARGET)

    def _refit_standardization(self, z: np.ndarray, t: np.ndarray) -> None:
        """New input/target standardization from this data, absorbing the change into the weights."""
        center = z.mean(axis=0)
        std = z.std(axis=0)
        inv_scale = np.where(std > 1e-9, 1.0 / np.maximum(std, 1e-9), 0.0)
        y_center = float(t.mean())
        y_scale = float(max(t.std(), 1e-3))
        if self.trained:
            # Keep f(x) unchanged: (z-c)*s @ W = (z-c')*s' @ (s/s' W) + ((c'-c)*s) @ W.
            w0 = self.weights[0]
            ratio = np.divide(self.x_inv_scale, inv_scale, out=np.zeros_like(inv_scale), where=inv_scale > 0)
            self.biases[0] = self.biases[0] + ((center - self.x_center) * self.x_inv_scale) @ w0
            self.weights[0] = w0 * ratio[:, None]
            # Keep out*ys + yc unchanged: out' = out * ys/ys' + (yc - yc')/ys'.
            self.weights[-1] = self.weights[-1] * (self.y_scale / y_scale)
            self.biases[-1] = (self.biases[-1] * self.y_scale + self.y_center - y_center) / y_scale
        self.x_center, self.x_inv_scale = center, inv_scale
        self.y_center, self.y_scale = y_center, y_scale

    def learn_many(self, x_rows: np.ndarray, ttft_ms: np.ndarray) -> None:
        """Fine-tune for `epochs` passes of shuffled mini-batches (at least `min_steps` steps) over this set."""
        z = self._inputs(x_rows)
        t = forward_target(ttft_ms, TARGET).astype(np.float64)
        if len(t) == 0:
            return
        self._refit_standardization(z, t)
        h = (z - self.x_center) * self.x_inv_scale
        y = (t - self.y_center) / self.y_scale
        n = len(y)
        batches = -(-n // self.batch_size)
        # Small training sets (cold start) get more passes: at least `min_steps` Adam steps per call.
        epochs = max(self.epochs, -(-self.min_steps // batches))
        with single_threaded_blas():
            for _ in range(epochs):
                order = self.rng.permutation(n)
                for start in range(0, n, self.batch_size):
                    idx = order[start:start + self.batch_size]
                    self._adam_step(h[idx], y[idx])
        self.n_learned += n

    def learn_one(self, x_row: np.ndarray, ttft_ms: float) -> None:
        """One Adam step on one sample (the trainer normally uses learn_many on replayed data)."""
        z = self._inputs(x_row)
        if not self.trained:
            self._refit_standardization(z, forward_target(np.array([ttft_ms]), TARGET))
        h = (z - self.x_center) * self.x_inv_scale
        y = (forward_target(np.array([ttft_ms]), TARGET) - self.y_center) / self.y_scale
        self._adam_step(h, y)
        self.n_learned += 1

    def _adam_step(self, h: np.ndarray, y: np.ndarray, beta1: float = 0.9, beta2: float = 0.999,
                   eps: float = 1e-8) -> None:
        out, acts = self._forward(h)
        grad = (2.0 / len(y)) * (out - y)[:, None]  # d(mean squared error)/d(output)
        grads_w: list[np.ndarray] = [np.empty(0)] * len(self.weights)
        grads_b: list[np.ndarray] = [np.empty(0)] * len(self.biases)
        for i in range(len(self.weights) - 1, -1, -1):
            grads_w[i] = acts[i].T @ grad + self.l2 * self.weights[i]
            grads_b[i] = grad.sum(axis=0)
            if i > 0:
                grad = (grad @ self.weights[i].T) * (acts[i] > 0.0)
        self.adam_t += 1
        lr_t = self.lr * np.sqrt(1.0 - beta2**self.adam_t) / (1.0 - beta1**self.adam_t)
        for p, g, m, v in zip(self._params(), [*grads_w, *grads_b], self.adam_m, self.adam_v, strict=True):
            m *= beta1
            m += (1.0 - beta1) * g
            v *= beta2
            v += (1.0 - beta2) * g * g
            p -= lr_t * m / (np.sqrt(v) + eps)

    def to_snapshot(self, version: int) -> Snapshot:
        """The network as a dense snapshot (one layer per weight matrix)."""
        arrays: dict[str, np.ndarray] = {"x_center": self.x_center.copy(), "x_inv_scale": self.x_inv_scale.copy()}
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            arrays[f"layer{i}_w"] = w.copy()
            arrays[f"layer{i}_b"] = b.copy()
        meta = {
            "layers": len(self.weights),
            "log1p_features": list(self.layout.log1p_features),
            "target": {"transform": TARGET, "center": self.y_center, "scale": self.y_scale},
        }
        return Snapshot(version, self.family, KIND_DENSE, self.layout.feature_names, arrays, meta)

    def state_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "layout": self.layout.to_dict(),
            "params": {"hidden": list(self.hidden), "lr": self.lr, "epochs": self.epochs,
                       "min_steps": self.min_steps, "batch_size": self.batch_size, "l2": self.l2,
                       "seed": self.seed},
            "n_learned": self.n_learned,
            "rng": self.rng.bit_generator.state,
            "weights": [encode_array(w) for w in self.weights],
            "biases": [encode_array(b) for b in self.biases],
            "x_center": encode_array(self.x_center),
            "x_inv_scale": encode_array(self.x_inv_scale),
            "y_center": self.y_center,
            "y_scale": self.y_scale,
            "adam_t": self.adam_t,
            "adam_m": [encode_array(a) for a in self.adam_m],
            "adam_v": [encode_array(a) for a in self.adam_v],
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> MLPModel:
        params = dict(state["params"])
        params["hidden"] = tuple(params["hidden"])
        model = cls(InputLayout.from_dict(state["layout"]), **params)
        model.n_learned = int(state["n_learned"])
        model.rng.bit_generator.state = state["rng"]
        model.weights = [decode_array(a, "weights") for a in state["weights"]]
        model.biases = [decode_array(a, "biases") for a in state["biases"]]
        model.x_center = decode_array(state["x_center"], "x_center")
        model.x_inv_scale = decode_array(state["x_inv_scale"], "x_inv_scale")
        model.y_center = float(state["y_center"])
        model.y_scale = float(state["y_scale"])
        model.adam_t = int(state["adam_t"])
        model.adam_m = [decode_array(a, "adam_m") for a in state["adam_m"]]
        model.adam_v = [decode_array(a, "adam_v") for a in state["adam_v"]]
        return model
