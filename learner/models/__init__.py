"""Online TTFT model families behind one interface (OnlineTTFTModel), built by name."""

from __future__ import annotations

from typing import Any

from learner.models.base import InputLayout, OnlineTTFTModel
from learner.models.mlp import MLPModel
from learner.models.ridge_residual import RidgeResidualModel
from learner.models.river_linear import RiverLinearModel

MODEL_FAMILIES: dict[str, type[RiverLinearModel] | type[MLPModel] | type[RidgeResidualModel]] = {
    RiverLinearModel.family: RiverLinearModel,
    MLPModel.family: MLPModel,
    RidgeResidualModel.family: RidgeResidualModel,
}


def make_model(family: str, **params: Any) -> OnlineTTFTModel:
    """A fresh model of the named family (`river` or `mlp`); params go to its constructor."""
    try:
        cls = MODEL_FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown model family {family!r}; known: {', '.join(sorted(MODEL_FAMILIES))}") from None
    return cls(**params)


def model_from_state(state: dict[str, Any]) -> OnlineTTFTModel:
    """Rebuild a model from its state_dict()."""
    family = state.get("family")
    if family not in MODEL_FAMILIES:
        raise ValueError(f"checkpoint has unknown model family {family!r}")
    return MODEL_FAMILIES[family].from_state(state)


__all__ = ["InputLayout", "MLPModel", "OnlineTTFTModel", "RidgeResidualModel", "RiverLinearModel", "make_model",
           "model_from_state"]
