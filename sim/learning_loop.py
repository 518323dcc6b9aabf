"""The learner inside the simulator: the live learning loop, in virtual time.

`LearningLoop` is the simulator's TelemetrySink. Each completed request's routed features and observed
TTFT go to the same `Learner` the live learner service runs; at the live cadence (every N events or T
seconds, here of virtual time) the learner's snapshot is signed, encoded, decoded and verified exactly
as it travels through Redis (with a key of this process's own: nothing leaves it), and hot-swapped
into the `learned` policy the simulator routes with. So the simulator measures what the live system
would do, cold start included.

Registered simulator policies: `learned` (the model family from settings, `mlp` by default),
`learned_river` and `learned_mlp`. Options (from `lodestar bench sim`) go to the learner config
(`snapshot_every_events`, `warmup_snapshot_every_events`, ...), the model (`hidden`, `lr`, ...) or the policy
(`fallback`, `epsilon_start`, ...), by name.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dispatcher.policies.base import Policy
from dispatcher.policies.learned import LearnedPolicy
from learner.trainer import Learner, LearnerConfig, make_learner
from lodestar import snapshot as codec
from lodestar.settings import Settings
from sim.policy_factory import PolicyContext, PolicySetup, register_sim_policy
from sim.records import CompletedRequest

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(LearnerConfig)}
_POLICY_OPTIONS = {"fallback", "epsilon_start", "epsilon_min", "epsilon_half_life", "explore_within",
                   "require_validated", "check_range"}


class LearningLoop:
    """Feeds completions to a Learner and installs each new snapshot in the learned policy."""

    def __init__(self, learner: Learner, policy: LearnedPolicy, key: codec.SigningKey | None = None):
        self.learner = learner
        self.policy = policy
        self.key = key or codec.SigningKey("sim", os.urandom(32))
        self.snapshots: list[dict[str, Any]] = []

    def observe(self, record: CompletedRequest) -> None:
        """Learn from one completion (the chosen worker's features as routed, and the TTFT observed)."""
        if record.features is None:
            return
        self.learner.observe(record.features, record.ttft_s * 1000.0, record.finished_s)

    def tick(self, now_s: float) -> Policy | None:
        """Publish a snapshot when the learner's cadence says so; the policy swaps it in place."""
        snap = self.learner.maybe_snapshot(now_s)
        if snap is None:
            return None
        self.policy.load_snapshot(codec.decode(codec.encode(snap, self.key), {self.key.key_id: self.key.secret}))
        holdout = snap.meta.get("holdout", {})
        self.snapshots.append({
            "version": snap.version, "at_s": now_s, "validated": snap.validated,
            "n_seen": snap.meta.get("n_seen"), "holdout_log_mae": holdout.get("log_mae"),
            "holdout_skill": holdout.get("skill"),
        })
        return None


def build_learning_setup(family: str, ctx: PolicyContext) -> PolicySetup:
    """A cold-start learned policy and the learning loop that trains it during the run."""
    settings = Settings()
    options = dict(ctx.options)
    config_opts = {k: options.pop(k) for k in list(options) if k in _CONFIG_FIELDS}
    policy_opts = {k: options.pop(k) for k in list(options) if k in _POLICY_OPTIONS}
    if family == "mlp":
        options.setdefault("seed", ctx.seed)
    learner = make_learner(family, LearnerConfig.from_settings(settings.learner, **{"seed": ctx.seed, **config_opts}),
                           **options)
    policy = LearnedPolicy(seed=ctx.seed, **{"fallback": settings.dispatcher.fallback_policy, **policy_opts})
    return PolicySetup(policy, LearningLoop(learner, policy))


@register_sim_policy("learned")
def _learned(ctx: PolicyContext) -> PolicySetup:
    return build_learning_setup(Settings().learner.model, ctx)


@register_sim_policy("learned_river")
def _learned_river(ctx: PolicyContext) -> PolicySetup:
    return build_learning_setup("river", ctx)


@register_sim_policy("learned_mlp")
def _learned_mlp(ctx: PolicyContext) -> PolicySetup:
    return build_learning_setup("mlp", ctx)
