"""The interface every online TTFT model implements, and the input layout they share.

A model learns from feature rows in lodestar.features.FEATURE_NAMES order and the observed TTFT in
ms, predicts TTFT in ms, exports itself as a `dense` snapshot (lodestar/ttft_model.py evaluates it with
numpy in the dispatcher) and saves its full state as plain JSON-able data (never pickle).

A model family is a class in a module of this package with a `family` name and this interface; the
registry (`learner.models.registry`) finds it there. Its constructor takes an optional `layout`, maybe
the run's `seed`, and declares its hyperparameters with their bounds and meaning
(`Annotated[float, Field(gt=0, description=...)] = default`, see lodestar/params.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from lodestar.features import FEATURE_NAMES, HEAVY_TAILED, column_indices
from lodestar.snapshot import Snapshot


@runtime_checkable
class OnlineTTFTModel(Protocol):
    """A TTFT regressor that learns online and exports a numeric snapshot."""

    family: str
    # True: learns from each sample as it arrives (learn_one). False: retrained periodically on a
    # replay sample (learn_many) by the trainer.
    incremental: bool

    def learn_one(self, x_row: np.ndarray, ttft_ms: float) -> None:
        """Learn from one (full FEATURE_NAMES row, observed TTFT in ms)."""
        ...

    def learn_many(self, x_rows: np.ndarray, ttft_ms: np.ndarray) -> None:
        """Learn from a batch of rows and their observed TTFTs."""
        ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Predicted TTFT in ms for each row of a (n, N_FEATURES) matrix."""
        ...

    @property
    def trained(self) -> bool:
        """Whether the model has learned anything yet."""
        ...

    def to_snapshot(self, version: int) -> Snapshot:
        """The model as a `dense` snapshot with the given version (metadata is the trainer's job)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume learning identically, as JSON-able data."""
        ...

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> OnlineTTFTModel:
        """The model `state_dict()` saved, predicting and learning on exactly as it would have."""
        ...


@dataclass(frozen=True)
class InputLayout:
    """Which feature columns a model reads and which of them it sees through log1p."""

    feature_names: tuple[str, ...] = FEATURE_NAMES
    log1p_features: tuple[str, ...] = HEAVY_TAILED

    def __post_init__(self) -> None:
        column_indices(self.feature_names)  # raises on unknown names
        extra = set(self.log1p_features) - set(self.feature_names)
        if extra:
            object.__setattr__(self, "log1p_features",
                               tuple(n for n in self.log1p_features if n in self.feature_names))

    @property
    def columns(self) -> np.ndarray:
        return column_indices(self.feature_names)

    @property
    def log1p_mask(self) -> np.ndarray:
        return np.array([n in self.log1p_features for n in self.feature_names], dtype=bool)

    def to_dict(self) -> dict[str, list[str]]:
        return {"feature_names": list(self.feature_names), "log1p_features": list(self.log1p_features)}

    @classmethod
    def from_dict(cls, d: dict[str, Sequence[str]]) -> InputLayout:
        return cls(tuple(d["feature_names"]), tuple(d["log1p_features"]))
