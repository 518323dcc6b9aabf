"""Model families: the dispatcher's numpy evaluation of a snapshot equals the model's own predictions,
models learn the synthetic physics, and state_dict/from_state resumes learning identically."""

from __future__ import annotations

import json

import numpy as np
import pytest

from learner.models import InputLayout, MLPModel, RiverLinearModel, make_model, model_from_state
from lodestar import snapshot as codec
from lodestar.features import FEATURE_INDEX, N_FEATURES
from lodestar.ttft_model import TTFTModel

KEY = "k"


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows with a TTFT that grows with the prefill backlog per unit of GPU speed."""
    rng = np.random.default_rng(seed)
    x = np.abs(rng.normal(size=(n, N_FEATURES))) * 50.0
    x[:, FEATURE_INDEX["kv_usage"]] = rng.uniform(0.0, 1.0, n)
    x[:, FEATURE_INDEX["gpu_speed"]] = rng.choice([0.4, 1.0, 3.2], n)
    backlog = rng.uniform(0, 20_000, n)
    x[:, FEATURE_INDEX["backlog_tokens_per_speed"]] = backlog / x[:, FEATURE_INDEX["gpu_speed"]]
    y = 15.0 + 0.2 * x[:, FEATURE_INDEX["backlog_tokens_per_speed"]] * rng.lognormal(0.0, 0.05, n)
    return x, y


@pytest.mark.parametrize("family", ["river", "mlp"])
def test_snapshot_evaluated_by_dispatcher_matches_model(family: str) -> None:
    x, y = synthetic(1500, 0)
    model = make_model(family, **({"hidden": (16, 16)} if family == "mlp" else {}))
    model.learn_many(x, y)
    snap = codec.decode(codec.encode(model.to_snapshot(3), KEY), KEY)
    xt, _ = synthetic(200, 1)
    np.testing.assert_allclose(TTFTModel(snap).predict(xt), model.predict(xt), rtol=1e-9)
    assert TTFTModel(snap).version == 3


@pytest.mark.parametrize("family", ["river", "mlp"])
def test_models_learn_the_physics(family: str) -> None:
    x, y = synthetic(3000, 0)
    model = make_model(family, **({"hidden": (32, 32)} if family == "mlp" else {}))
    for _ in range(1 if family == "river" else 3):
        model.learn_many(x, y)
    xt, yt = synthetic(500, 2)
    mape = np.mean(np.abs(model.predict(xt) - yt) / yt)
    constant = np.mean(np.abs(np.median(y) - yt) / yt)
    assert mape < 0.3 < constant


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


@pytest.mark.parametrize("family", ["river", "mlp"])
def test_state_round_trip_resumes_identically(family: str) -> None:
    x, y = synthetic(600, 0)
    model = make_model(family, **({"hidden": (8, 8), "epochs": 1} if family == "mlp" else {}))
    model.learn_many(x[:300], y[:300])
    state = json.loads(json.dumps(model.state_dict()))
    resumed = model_from_state(state)
    model.learn_many(x[300:], y[300:])
    resumed.learn_many(x[300:], y[300:])
    np.testing.assert_array_equal(resumed.predict(x), model.predict(x))


def test_unknown_family() -> None:
    with pytest.raises(KeyError, match="unknown model family"):
        make_model("forest")
    with pytest.raises(ValueError, match="unknown model family"):
        model_from_state({"family": "forest"})


def test_residual_mlp_learns_the_correction_of_a_prior_and_the_dispatcher_agrees() -> None:
    """With residual_feature, the MLP regresses log TTFT minus log of that feature (the analytic prior):
    it learns a 2.5x bias of the prior on fast GPUs, and the dispatcher's evaluation adds the prior back."""
    x, _ = synthetic(2000, 0)
    prior = FEATURE_INDEX["ttft_estimate_ms"]
    x[:, prior] = np.random.default_rng(4).uniform(10.0, 5000.0, len(x))
    fast = x[:, FEATURE_INDEX["gpu_speed"]] > 2
    y = x[:, prior] * np.where(fast, 2.5, 1.0)
    model = MLPModel(hidden=(16,), residual_feature="ttft_estimate_ms", seed=1)
    for _ in range(3):
        model.learn_many(x, y)
    pred = model.predict(x)
    assert np.median(np.abs(np.log(pred / y))) < 0.1
    snap = codec.decode(codec.encode(model.to_snapshot(2), KEY), KEY)
    assert snap.meta["target"]["base_feature"] == "ttft_estimate_ms"
    np.testing.assert_allclose(TTFTModel(snap).predict(x[:100]), pred[:100], rtol=1e-9)
    restored = model_from_state(json.loads(json.dumps(model.state_dict())))
    np.testing.assert_allclose(restored.predict(x[:100]), pred[:100], rtol=1e-12)


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
    snap = codec.decode(codec.encode(model.to_snapshot(7), KEY), KEY)
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
    with pytest.raises(ValueError, match="l2"):
        make_model("ridge_residual", l2=0.0)


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
