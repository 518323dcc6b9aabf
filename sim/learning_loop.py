"""The learner inside the simulator: the live learning loop, in virtual time.

`LearningLoop` is the simulator's TelemetrySink. Each completed request's routed features and observed
TTFT go to the same `Learner` the live learner service runs; at the live cadence (every N events or T
seconds, here of virtual time) the learner's snapshot is signed, encoded, decoded and verified exactly
as it travels through Redis (with a key of this process's own: nothing leaves it), and hot-swapped
into the `learned` policy the simulator routes with. So the simulator measures what the live system
would do, cold start included.

`learning_loop(family, seed=..., params=...)` builds one from cold: the `learned` policy with `params`
(its own parameters, such as `worker_correction` or `check_range`, validated as the dispatcher validates
`dispatcher.policy_params`), plus two optional sections: `learner` (LearnerConfig fields over the live
cadence from settings, e.g. `snapshot_every_events`) and `model` (the family's hyperparameters, e.g.
`hidden`, `lr`). `lodestar bench sim --policy-params` passes them, per policy label.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from dispatcher.policies.learned import LearnedPolicy
from dispatcher.policies.registry import make_policy
from learner.trainer import Learner, LearnerConfig, make_learner
from lodestar import snapshot as codec
from lodestar.params import ParamsError, validate_params
from lodestar.settings import Settings
from sim.records import CompletedRequest

LEARNER_SECTION = "learner"
MODEL_SECTION = "model"


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

    def tick(self, now_s: float) -> None:
        """Publish a snapshot when the learner's cadence says so; the policy swaps it in place."""
        snap = self.learner.maybe_snapshot(now_s)
        if snap is None:
            return
        self.policy.load_snapshot(codec.decode(codec.encode(snap, self.key), {self.key.key_id: self.key.secret}))
        holdout = snap.meta.get("holdout", {})
        self.snapshots.append({
            "version": snap.version, "at_s": now_s, "validated": snap.validated,
            "n_seen": snap.meta.get("n_seen"), "holdout_log_mae": holdout.get("log_mae"),
            "holdout_skill": holdout.get("skill"),
        })


def _sections(params: Mapping[str, Any]) -> tuple[dict[str, Any], Mapping[str, Any], Mapping[str, Any]]:
    """(the policy's own parameters, the learner section, the model section)."""
    if not isinstance(params, Mapping):
        raise ParamsError(f"learned policy parameters must be a mapping, not {type(params).__name__}")
    policy = {k: v for k, v in params.items() if k not in (LEARNER_SECTION, MODEL_SECTION)}
    return policy, params.get(LEARNER_SECTION) or {}, params.get(MODEL_SECTION) or {}


def learning_loop(family: str, *, seed: int, params: Mapping[str, Any]) -> LearningLoop:
    """A cold-start learned policy and the learning loop that trains it during the run.

    Every parameter is validated (ParamsError naming the section and the field) before the run starts.
    """
    settings = Settings()
    policy_params, learner_section, model_section = _sections(params)
    overrides = validate_params(LearnerConfig, learner_section, owner=f"{LEARNER_SECTION} section",
                                exclude=frozenset({"seed"}))
    config = LearnerConfig.from_settings(settings.learner, seed=seed, **overrides)
    learner = make_learner(family, config, seed=seed, model_params=model_section)
    policy = make_policy(LearnedPolicy.name, policy_params, seed=seed)
    assert isinstance(policy, LearnedPolicy)
    return LearningLoop(learner, policy)
