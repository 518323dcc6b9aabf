"""How `lodestar bench sim` builds a policy by name, with the telemetry sink that goes with it.

Routing policies from the dispatcher's registry (`dispatcher.policies.make_policy`, every one of which
takes a `seed`) need no sink.
Simulator-side setups register a builder here: the oracle (it reads the engines), and the learned
policy with its learner running as a `TelemetrySink` in virtual time. A builder receives the run's
context and returns the policy plus an optional sink.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dispatcher.policies.base import Policy, make_policy, policy_names
from sim.cluster import ClusterSpec
from sim.oracle import OraclePolicy
from sim.telemetry import TelemetrySink


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """What a builder may use: the policy name, the run's seed, the cluster and free-form options."""

    name: str
    seed: int
    cluster: ClusterSpec
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PolicySetup:
    """A policy to route with and, for a learning policy, the sink that observes completions."""

    policy: Policy
    sink: TelemetrySink | None = None


SimPolicyBuilder = Callable[[PolicyContext], PolicySetup]
_BUILDERS: dict[str, SimPolicyBuilder] = {}


def register_sim_policy(name: str) -> Callable[[SimPolicyBuilder], SimPolicyBuilder]:
    """Decorator: `build_policy(name)` calls this builder instead of the dispatcher's registry."""

    def deco(builder: SimPolicyBuilder) -> SimPolicyBuilder:
        if name in _BUILDERS:
            raise ValueError(f"simulator policy {name!r} registered twice")
        _BUILDERS[name] = builder
        return builder

    return deco


@register_sim_policy("oracle")
def _oracle(ctx: PolicyContext) -> PolicySetup:
    return PolicySetup(OraclePolicy(seed=ctx.seed))


def sim_only_names() -> list[str]:
    """Policies that exist only in the simulator (built here, not by the dispatcher's registry)."""
    return sorted(_BUILDERS)


def available_policies() -> list[str]:
    """Every name `build_policy` accepts."""
    return sorted(set(policy_names()) | set(_BUILDERS))


def build_policy(name: str, *, seed: int, cluster: ClusterSpec, **options: Any) -> PolicySetup:
    """The policy called `name` for one run with `seed`; options go to its builder or constructor."""
    builder = _BUILDERS.get(name)
    if builder is not None:
        return builder(PolicyContext(name, seed, cluster, dict(options)))
    if name not in policy_names():
        raise KeyError(f"unknown policy {name!r}; known: {', '.join(available_policies())}")
    return PolicySetup(make_policy(name, **{"seed": seed, **options}))
import sim.learned_prior_setup  # noqa: E402,F401 - registers `learned_prior` (it imports this module)
import sim.learning_loop  # noqa: E402,F401 - registers the learned policies (it imports this module)
