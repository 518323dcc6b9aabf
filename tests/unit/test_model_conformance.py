"""One suite for every model family of the registry (the way river checks every estimator): a new family
module is checked here without being named. Each family, with its default hyperparameters: learns a known
function, its state round-trips (same predictions, same learning afterwards), its snapshot evaluates the
same in the dispatcher's numpy evaluator, and its parameters are documented."""

from __future__ import annotations

import json

import numpy as np
import pytest
from ttft_samples import synthetic

from learner.models.base import OnlineTTFTModel
from learner.models.registry import RUN_PARAMS, make_model, model_class, model_families, model_from_state
from lodestar import snapshot as codec
from lodestar.params import ParamsError, describe, validate_params
from lodestar.ttft_model import TTFTModel

KEY = codec.SigningKey("k", b"k" * 32)


def test_the_registry_finds_every_model_module() -> None:
    families = model_families()
    assert families == sorted(families) and {"mlp", "river"} <= set(families)
    with pytest.raises(KeyError, match="unknown model family 'forest'; known: "):
        make_model("forest")
    with pytest.raises(ValueError, match="unknown model family 'forest'"):
        model_from_state({"family": "forest"})


@pytest.mark.parametrize("family", model_families())
def test_built_by_name(family: str) -> None:
    model = make_model(family, seed=3)
    assert isinstance(model, OnlineTTFTModel) and type(model) is model_class(family)
    assert model.family == family and not model.trained


@pytest.mark.parametrize("family", model_families())
def test_learns_a_known_function_well_below_a_constant(family: str) -> None:
    x, y = synthetic(3000, 0)
    model = make_model(family, seed=0)
    for _ in range(3):
        model.learn_many(x, y)
    assert model.trained
    xt, yt = synthetic(500, 2)
    error = np.mean(np.abs(model.predict(xt) - yt) / yt)
    constant = np.mean(np.abs(np.median(y) - yt) / yt)
    assert error < 0.3 and error < constant / 3


@pytest.mark.parametrize("family", model_families())
def test_state_round_trips_and_resumes_learning_identically(family: str) -> None:
    x, y = synthetic(600, 0)
    model = make_model(family, seed=1)
    model.learn_many(x[:300], y[:300])
    resumed = model_from_state(json.loads(json.dumps(model.state_dict())))  # JSON: no pickle, nothing hidden
    assert type(resumed) is type(model)
    np.testing.assert_array_equal(resumed.predict(x), model.predict(x))
    model.learn_many(x[300:], y[300:])
    resumed.learn_many(x[300:], y[300:])
    np.testing.assert_array_equal(resumed.predict(x), model.predict(x))
    model.learn_one(x[0], float(y[0]))
    resumed.learn_one(x[0], float(y[0]))
    np.testing.assert_array_equal(resumed.predict(x), model.predict(x))


@pytest.mark.parametrize("family", model_families())
def test_snapshot_evaluates_the_same_in_the_dispatcher(family: str) -> None:
    x, y = synthetic(1500, 0)
    model = make_model(family, seed=0)
    model.learn_many(x, y)
    snap = codec.decode(codec.encode(model.to_snapshot(3), KEY), {KEY.key_id: KEY.secret})  # as through Redis
    assert snap.family == family and snap.version == 3
    xt, _ = synthetic(200, 1)
    np.testing.assert_allclose(TTFTModel(snap).predict(xt), model.predict(xt), rtol=1e-9)


@pytest.mark.parametrize("family", model_families())
def test_parameters_are_documented_and_their_defaults_valid(family: str) -> None:
    cls = model_class(family)
    for p in describe(cls, RUN_PARAMS):
        assert p.description, f"{family}.{p.name} has no description"
        assert validate_params(cls, {p.name: p.default}, owner=family, exclude=RUN_PARAMS) == {p.name: p.default}
    with pytest.raises(ParamsError, match=f"model family '{family}': no_such_parameter: Extra inputs"):
        make_model(family, {"no_such_parameter": 1})
