"""The `learned_prior` policy in the simulator, with its learner in the loop (virtual time).

Same learning loop as `learned` (sim/learning_loop.py: the live cadence, snapshots signed and verified
as they travel through Redis), with the learner validating each model against the analytic TTFT
estimate instead of the median. Options (from `lodestar bench sim`) go to the learner config, the model
or the policy, by name.
"""

from __future__ import annotations

import dataclasses

from dispatcher.policies.learned_prior import PRIOR, LearnedPriorPolicy
from learner.trainer import LearnerConfig, make_learner
from lodestar.settings import Settings
from sim.policy_factory import PolicyContext, PolicySetup, register_sim_policy

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(LearnerConfig)}
_POLICY_OPTIONS = {"require_validated", "check_range", "worker_correction"}
# A model replaces the estimate once its held-out log error is this much (relative) below the estimate's.
MIN_SKILL_OVER_PRIOR = 0.05
# The correction model: a ridge regression of the estimate's log error (learner/models/ridge_residual.py).
# Trained on the recent samples only: the stratified replay of `learned` over-weights rare TTFT octaves,
# which a model of the typical error of the estimate must not.
FAMILY = "ridge_residual"


@register_sim_policy("learned_prior")
def _learned_prior(ctx: PolicyContext) -> PolicySetup:
    from sim.learning_loop import LearningLoop  # here: sim.learning_loop imports the factory that imports us

    settings = Settings()
    options = dict(ctx.options)
    config_opts = {k: options.pop(k) for k in list(options) if k in _CONFIG_FIELDS}
    policy_opts = {k: options.pop(k) for k in list(options) if k in _POLICY_OPTIONS}
    family = options.pop("family", FAMILY)
    if family in ("mlp", "ridge_residual"):
        options.setdefault("residual_feature", PRIOR)  # learn the correction of the estimate, not TTFT afresh
    if family == "mlp":
        options.setdefault("seed", ctx.seed)
    config = LearnerConfig.from_settings(settings.learner, **{
        "seed": ctx.seed, "baseline_feature": PRIOR, "min_holdout_skill": MIN_SKILL_OVER_PRIOR,
        "diverse_capacity": 0, **config_opts})
    learner = make_learner(family, config, **options)
    policy = LearnedPriorPolicy(seed=ctx.seed, **policy_opts)
    return PolicySetup(policy, LearningLoop(learner, policy, settings.learner.hmac_key))
