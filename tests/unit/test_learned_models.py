"""Family-specific model behaviour (what every family must do is in test_model_conformance.py): river's
predictions are river's own, the MLP's restandardization keeps its function, a model may read a subset
of the features."""

from __future__ import annotations

import numpy as np
import pytest
from ttft_samples import synthetic

from learner.models.base import InputLayout
from learner.models.mlp import MLPModel
from learner.models.river_linear import RiverLinearModel
from lodestar.ttft_model import TTFTModel


def test_river_predictions_are_rivers_own() -> None:
    x, y = synthetic(300, 0)
    model = RiverLinearModel()
    model.learn_many(x, y)
    z = model._as_dicts(x[:1])[0]
    direct = model.regressor.predict_one(model.scaler.transform_one(z))
    assert model.predict(x[:1])[0] == pytest.approx(np.expm1(direct))


def test_mlp_restandardization_keeps_the_function() -> None:
    x, y = synthetic(800, 0)
    model = MLPModel(hidden=(8,), epochs=1)
    model.learn_many(x, y)
    xt, _ = synthetic(100, 1)
    before = model.predict(xt)
    x2, y2 = synthetic(800, 5)
    model._refit_standardization(model._inputs(x2 * 3.0), np.log1p(y2 * 10.0))
    np.testing.assert_allclose(model.predict(xt), before, rtol=1e-9)


def test_layout_subset_of_features() -> None:
    layout = InputLayout(("uncached_per_speed", "backlog_tokens_per_speed", "kv_usage"))
    assert layout.log1p_features == ("uncached_per_speed", "backlog_tokens_per_speed")
    x, y = synthetic(500, 0)
    model = RiverLinearModel(layout)
    model.learn_many(x, y)
    snap = model.to_snapshot(1)
    assert snap.feature_names == layout.feature_names
    np.testing.assert_allclose(TTFTModel(snap).predict(x[:20]), model.predict(x[:20]), rtol=1e-9)
