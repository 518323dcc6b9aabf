"""How the simulator builds the policy of a run, with the telemetry sink that goes with it.

A run names its policy with a `PolicySpec`: a label (the name its results carry), the policy, and the
policy's parameters. The simulator knows every policy of the dispatcher's registry (built by
`make_policy`, each with the run's `seed`), and two kinds of its own:

- `oracle`: the least true TTFT, read from the simulated engines (sim/oracle.py);
- `learned_<family>` for every model family of `learner.models.registry`, and `learned` for the family
  in settings (`learner.model`): the `learned` policy with a learner training it during the run, in
  virtual time (sim/learning_loop.py). These take the `learned` policy's parameters plus `learner` and
  `model` sections.

Parameters are those in settings (`dispatcher.policy_params`, by policy name, as the dispatcher uses
them; the learned variants take those of `learned`), updated by the spec's own.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dispatcher.policies.base import Policy
from dispatcher.policies.learned import LearnedPolicy
from dispatcher.policies.registry import make_policy, policy_class, policy_names
from learner.models.registry import model_class, model_families
from lodestar.params import validate_params
from lodestar.plugins import UnknownName
from lodestar.settings import Settings
from sim.learning_loop import learning_loop
from sim.oracle import OraclePolicy
from sim.telemetry import TelemetrySink

LEARNED = LearnedPolicy.name
ORACLE = OraclePolicy.name


@dataclass(frozen=True, slots=True)
class PolicySpec:
    """One policy of a benchmark: `label` names it in results, `policy` says what runs, with `params`."""

    label: str
    policy: str
    params: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> PolicySpec:
        """`policy` or `label=policy` (two variants of one policy side by side need two labels)."""
        label, sep, policy = text.strip().partition("=")
        label, policy = label.strip(), policy.strip()
        if not sep:
            policy = label
        if not label or not policy:
            raise ValueError(f"bad policy spec {text!r}: expected `policy` or `label=policy`")
        return cls(label, policy)


@dataclass(slots=True)
class PolicySetup:
    """A policy to route with and, for a learning policy, the sink that observes completions."""

    policy: Policy
    sink: TelemetrySink | None = None


def learned_families() -> dict[str, str]:
    """The simulator's learned policies and the model family each trains: `learned` and `learned_<family>`."""
    return {LEARNED: Settings().learner.model, **{f"{LEARNED}_{f}": f for f in model_families()}}


def sim_only_names() -> list[str]:
    """Policies that exist only in the simulator (the oracle and the learned variants with a learner)."""
    return sorted({ORACLE, *learned_families()} - {LEARNED})


def available_policies() -> list[str]:
    """Every policy name a PolicySpec may use."""
    return sorted({*policy_names(), *sim_only_names()})


def first_line(cls: type) -> str:
    """The first line of a class's docstring: what it does, in one line."""
    return inspect.cleandoc(cls.__doc__ or "").partition("\n")[0]


def describe_policy(name: str) -> str:
    """What the policy called `name` does, in one line."""
    families = learned_families()
    if name in families:
        family = families[name]
        default = " (the family in settings, `learner.model`)" if name == LEARNED else ""
        return (f"`{LEARNED}` trained during the run by a `{family}` learner{default}: "
                f"{first_line(model_class(family))}")
    return first_line(OraclePolicy if name == ORACLE else policy_class(name))


def _params(spec: PolicySpec) -> dict[str, Any]:
    """The settings' parameters of the policy (by its dispatcher name), updated by the spec's."""
    base = LEARNED if spec.policy in learned_families() else spec.policy
    return {**Settings().dispatcher.policy_params.get(base, {}), **spec.params}


def build_sim_policy(spec: PolicySpec, *, seed: int) -> PolicySetup:
    """The policy of `spec` for one run with `seed`, and its telemetry sink if it learns.

    Raises KeyError for an unknown policy and ParamsError for parameters its constructors refuse.
    """
    params = _params(spec)
    families = learned_families()
    if spec.policy in families:
        loop = learning_loop(families[spec.policy], seed=seed, params=params)
        return PolicySetup(loop.policy, loop)
    if spec.policy == ORACLE:
        validate_params(OraclePolicy, params, owner=f"policy {ORACLE!r}", exclude=frozenset({"seed"}))
        return PolicySetup(OraclePolicy(seed=seed))
    if spec.policy not in policy_names():
        raise UnknownName(f"unknown policy {spec.policy!r}; known: {', '.join(available_policies())}")
    return PolicySetup(make_policy(spec.policy, params, seed=seed))


def check_spec(spec: PolicySpec) -> None:
    """Build the spec's policy once, so a bad name or parameter stops a benchmark before any run."""
    build_sim_policy(spec, seed=0)
