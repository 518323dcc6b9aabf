"""The TTFT model families by name, found by looking: every model class in a module of this package.

A new family is one new module under `learner/models/` holding a class with a `family` name and the
`OnlineTTFTModel` interface (base.py); nothing else is edited. The learner (`learner.model`), the
simulator's `learned_<family>` policies, the conformance tests and docs/policies.md all read this
registry. Model modules import the interface, never this module, so there is no import cycle.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, cast

from learner.models.base import InputLayout, OnlineTTFTModel
from lodestar.params import validate_params
from lodestar.plugins import find_classes, lookup

# Supplied by the code (the input layout, the run's seed), never a setting.
RUN_PARAMS = frozenset({"layout", "seed"})


@cache
def _classes() -> dict[str, type[OnlineTTFTModel]]:
    found = find_classes(__name__.rpartition(".")[0], Path(__file__).parent, "family", ("from_state",))
    return cast(dict[str, type[OnlineTTFTModel]], found)


def model_families() -> list[str]:
    """Names of every model family, sorted."""
    return list(_classes())


def model_class(family: str) -> type[OnlineTTFTModel]:
    """The class of the named family; KeyError listing the known families otherwise."""
    return cast(type[OnlineTTFTModel], lookup(_classes(), family, "model family"))


def check_params(family: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` validated against the family's constructor (ParamsError says what is wrong)."""
    return validate_params(model_class(family), params, owner=f"model family {family!r}", exclude=RUN_PARAMS)


def make_model(family: str, params: Mapping[str, Any] | None = None, *, layout: InputLayout | None = None,
               seed: int | None = None) -> OnlineTTFTModel:
    """A fresh model of the named family; `params` are validated against its constructor first.

    `seed` goes to families that draw random numbers (their constructor takes one) and is ignored by
    the others, so one run seed serves every family.
    """
    cls = model_class(family)
    run: dict[str, Any] = {} if layout is None else {"layout": layout}
    if seed is not None and "seed" in inspect.signature(cls).parameters:
        run["seed"] = seed
    return cls(**run, **check_params(family, params or {}))


def model_from_state(state: dict[str, Any]) -> OnlineTTFTModel:
    """Rebuild a model from its state_dict()."""
    family = state.get("family")
    if not isinstance(family, str) or family not in _classes():
        raise ValueError(f"checkpoint has unknown model family {family!r}; known: {', '.join(_classes())}")
    return _classes()[family].from_state(state)
