"""Family-specific model behaviour (what every family must do is in test_model_conformance.py): river's
predictions are river's own, the MLP's restandardization keeps its function, a model may read a subset
of the features, the ridge residual learns a per-GPU bias of the analytic prior and the dispatcher adds the
prior back."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ttft_samples import synthetic

from learner.models.base import InputLayout
from learner.models.mlp import MLPModel
from learner.models.registry import make_model, model_from_state
from learner.models.river_linear import RiverLinearModel
from lodestar import snapshot as codec
from lodestar.features import FEATURE_INDEX
from lodestar.params import ParamsError
from lodestar.ttft_model import TTFTModel

KEY = codec.SigningKey("k", b"k" * 32)
KEYS = {KEY.key_id: KEY.secret}


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


def prior_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose TTFT is the prior feature times a bias that depends on the GPU speed (2.3x to 0.8x), noisy."""
    x, _ = synthetic(n, seed)
    rng = np.random.default_rng(seed + 100)
    x[:, FEATURE_INDEX["ttft_estimate_ms"]] = rng.uniform(10.0, 5000.0, n)
    bias = np.exp(1.0 - 0.4 * x[:, FEATURE_INDEX["gpu_speed"]])
    y = x[:, FEATURE_INDEX["ttft_estimate_ms"]] * bias * rng.lognormal(0.0, 0.1, n)
    return x, y


def test_ridge_residual_learns_a_per_gpu_bias_of_the_prior() -> None:
    x, y = prior_data(600, 0)
    model = make_model("ridge_residual")
    assert not model.trained and not model.incremental
    model.learn_many(x, y)
    xt, yt = prior_data(300, 1)
    prior = xt[:, FEATURE_INDEX["ttft_estimate_ms"]]
    err = np.mean(np.abs(np.log(model.predict(xt) / yt)))
    assert err < 0.1 < 0.4 < np.mean(np.abs(np.log(prior / yt)))
    snap = codec.decode(codec.encode(model.to_snapshot(7), KEY), KEYS)
    assert snap.meta["target"]["base_feature"] == "ttft_estimate_ms" and snap.meta["layers"] == 1
    np.testing.assert_allclose(TTFTModel(snap).predict(xt), model.predict(xt), rtol=1e-9)


def test_ridge_residual_learn_one_matches_a_refit_and_state_round_trips() -> None:
    x, y = prior_data(400, 2)
    one = make_model("ridge_residual")
    one.learn_many(x[:300], y[:300])
    for row, t in zip(x[300:], y[300:], strict=True):
        one.learn_one(row, float(t))
    # the sufficient statistics are those of all 400 rows (standardized with the first 300's scale)
    restored = model_from_state(json.loads(json.dumps(one.state_dict())))
    np.testing.assert_allclose(restored.predict(x), one.predict(x), rtol=1e-12)
    batch = make_model("ridge_residual")
    batch.learn_many(x, y)
    assert np.mean(np.abs(np.log(one.predict(x) / batch.predict(x)))) < 0.02
    with pytest.raises(ParamsError, match="l2"):
        make_model("ridge_residual", {"l2": 0.0})


def test_a_base_feature_needs_a_log_target_and_a_known_feature() -> None:
    model = make_model("ridge_residual")
    model.learn_many(*prior_data(100, 3))
    snap = model.to_snapshot(1)
    snap.meta["target"]["transform"] = "identity"
    with pytest.raises(codec.SnapshotError, match="base_feature"):
        TTFTModel(snap)
    snap.meta["target"].update(transform="log1p", base_feature="no_such_feature")
    with pytest.raises(codec.SnapshotError, match="no_such_feature"):
        TTFTModel(snap)
