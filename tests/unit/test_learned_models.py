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

KEY = codec.SigningKey("k", b"k" * 32)


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
    snap = codec.decode(codec.encode(model.to_snapshot(3), KEY), {KEY.key_id: KEY.secret})
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
