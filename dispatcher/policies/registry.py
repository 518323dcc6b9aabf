"""The routing policies by name, found by looking: every policy class in a module of this package.

A new policy is one new module under `dispatcher/policies/` (or `baselines/`) holding a class with a
`name` and a `choose` method; nothing else is edited. The dispatcher (`dispatcher.policy`), the
simulator (`lodestar bench sim --policies`), the conformance tests and docs/policies.md all read this
registry. Policy modules import the interface (`base`), never this module's list, so there is no cycle:
discovery imports them at run time, on the first look-up.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, cast

from dispatcher.policies.base import Policy, SnapshotPolicy
from lodestar.params import ParamsError, validate_params
from lodestar.plugins import find_classes, lookup

# Supplied by whoever builds the policy (the run's seed), never a setting.
RUN_PARAMS = frozenset({"seed"})


@cache
def _classes() -> dict[str, type[Policy]]:
    found = find_classes(__name__.rpartition(".")[0], Path(__file__).parent, "name", ("choose",))
    return cast(dict[str, type[Policy]], found)


def policy_names() -> list[str]:
    """Names of every policy, sorted."""
    return list(_classes())


def policy_class(name: str) -> type[Policy]:
    """The class of the policy called `name`; KeyError listing the known names otherwise."""
    return cast(type[Policy], lookup(_classes(), name, "policy"))


def follows_snapshots(name: str) -> bool:
    """Whether the policy evaluates a model snapshot (so it needs a learner, and is no heuristic)."""
    return issubclass(policy_class(name), SnapshotPolicy)


def heuristic_names() -> list[str]:
    """The policies that decide without a model (fallback candidates, and a benchmark's baselines)."""
    return [name for name in _classes() if not follows_snapshots(name)]


def check_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """`params` validated against the constructor of policy `name` (ParamsError says what is wrong)."""
    return validate_params(policy_class(name), params, owner=f"policy {name!r}", exclude=RUN_PARAMS)


def check_params_by_policy(params_by_policy: Mapping[str, Mapping[str, Any]]) -> None:
    """Validate a `{policy name: {parameter: value}}` mapping (the `dispatcher.policy_params` setting) by
    building each policy with its parameters, so constraints between parameters are checked too."""
    for name, params in params_by_policy.items():
        if name not in _classes():
            raise ParamsError(f"parameters given for unknown policy {name!r}; known: {', '.join(_classes())}")
        make_policy(name, params)


def make_policy(name: str, params: Mapping[str, Any] | None = None, *, seed: int = 0) -> Policy:
    """Build the policy called `name` with `seed`; `params` are validated against its constructor first."""
    cls = policy_class(name)
    checked = check_params(name, params or {})
    try:
        return cls(seed=seed, **checked)
    except ValueError as err:  # constraints between parameters, checked by the constructor
        raise ParamsError(f"policy {name!r}: {err}") from None
