"""The `learned` policy: predict every candidate's TTFT from the current model snapshot, pick the least.

The snapshot comes from the learner (hot-swapped with `load_snapshot`, never per request). For each
request the shared candidate matrix (lodestar.features) is evaluated by lodestar.ttft_model with numpy
over all workers at once. A heuristic decides instead (the `fallback` parameter, default
`gpu_speed_queue`) while there is no snapshot, while the snapshot is not validated on held-out telemetry,
and whenever the candidate the model picks has features outside the range the model was trained on
(with the snapshot's margin): its prediction there is extrapolation, possibly optimistic.
Exploration is epsilon-greedy with a decaying epsilon and a seeded RNG, but only among the candidates
the model rates close to the best (predicted TTFT within `explore_within` times the least): that is
where its ranking is uncertain and a sample is informative, and a request is never sent to a worker
the model knows to be swamped. The fallback heuristic does not explore. Explored and fallback decisions
are flagged (`Decision.explored`, `Decision.fallback`; the fallback's are labelled `learned/<fallback>`),
and each decision carries the chosen candidate's feature row, so the caller need not compute it again.
"""

from __future__ import annotations

from typing import Annotated

import numpy as np
from pydantic import AfterValidator, Field

from dispatcher.policies.base import Policy
from dispatcher.policies.registry import follows_snapshots, make_policy, policy_names
from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.features import candidate_matrix
from lodestar.snapshot import Snapshot
from lodestar.ttft_model import TTFTModel

NAME = "learned"


def _heuristic(fallback: str | Policy) -> str | Policy:
    """A fallback named in settings must be a policy that decides without a model."""
    if isinstance(fallback, str):
        if fallback not in policy_names():
            raise ValueError(f"unknown policy {fallback!r}; known: {', '.join(policy_names())}")
        if follows_snapshots(fallback):
            raise ValueError(f"{fallback!r} needs a model itself; the fallback must be a heuristic")
    return fallback


class LearnedPolicy:
    """Least predicted TTFT under the current snapshot, with exploration and a heuristic fallback."""

    name = NAME

    def __init__(
        self,
        fallback: Annotated[str | Policy, AfterValidator(_heuristic), Field(
            description="heuristic that decides while the model cannot (no validated snapshot, or its pick is "
                        "out of its training range): a policy name, or a Policy object in code")
        ] = "gpu_speed_queue",
        epsilon_start: Annotated[float, Field(ge=0, le=1, description="exploration probability at the first "
                                                                      "decision")] = 0.05,
        epsilon_min: Annotated[float, Field(ge=0, le=1, description="exploration probability it decays to "
                                                                    "(at most epsilon_start)")] = 0.002,
        epsilon_half_life: Annotated[float, Field(gt=0, description="decisions over which the exploration "
                                                                    "above epsilon_min halves")] = 2000.0,
        explore_within: Annotated[float, Field(ge=1, description="explore only among candidates predicted "
                                                                 "within this factor of the best")] = 1.5,
        require_validated: Annotated[bool, Field(description="use only snapshots that passed held-out "
                                                             "validation")] = True,
        check_range: Annotated[bool, Field(description="fall back when the pick's features are outside the "
                                                       "snapshot's training range")] = True,
        seed: int = 0,
    ):
        if epsilon_min > epsilon_start:
            raise ValueError("need epsilon_min <= epsilon_start")
        self.fallback: Policy = make_policy(fallback, seed=seed) if isinstance(fallback, str) else fallback
        self.fallback_label = f"{NAME}/{self.fallback.name}"
        self.epsilon_start = epsilon_start
        self.epsilon_min = epsilon_min
        self.epsilon_half_life = epsilon_half_life
        self.explore_within = explore_within
        self.require_validated = require_validated
        self.check_range = check_range
        self.rng = np.random.default_rng(seed)
        self.decisions = 0
        self.model: TTFTModel | None = None

    def fallback_name(self) -> str:
        """The heuristic that routes while there is no usable model (and for out-of-range candidates)."""
        return self.fallback.name

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Swap in a new model; a snapshot this build cannot evaluate raises SnapshotError (model kept)."""
        self.model = TTFTModel(snapshot)

    @property
    def model_version(self) -> int:
        return 0 if self.model is None else self.model.version

    @property
    def epsilon(self) -> float:
        """The exploration probability of the next decision (halves every `epsilon_half_life` decisions)."""
        decay = 0.5 ** (self.decisions / self.epsilon_half_life)
        return self.epsilon_min + (self.epsilon_start - self.epsilon_min) * decay

    def _model_usable(self) -> bool:
        return self.model is not None and (self.model.validated or not self.require_validated)

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The candidate with the least predicted TTFT, or the fallback's choice; maybe explore."""
        coin = self.rng.random()
        epsilon = self.epsilon
        self.decisions += 1
        x: np.ndarray | None = None
        predicted: np.ndarray | None = None
        index = -1
        if self._model_usable():
            assert self.model is not None
            x = candidate_matrix(request, view)
            predicted = self.model.predict(x)
            best = np.flatnonzero(predicted <= predicted.min())
            index = int(best[0] if len(best) == 1 else self.rng.choice(best))
            # Only the pick matters: a candidate out of range but predicted slow is not chosen anyway.
            if self.check_range and self.model.out_of_range(x[index:index + 1])[0]:
                predicted = None
        if predicted is None:
            heuristic = self.fallback.choose(request, view)
            return Decision(
                index=heuristic.index,
                worker_id=view.worker_ids[heuristic.index],
                policy=self.fallback_label,
                scores=heuristic.scores,
                model_version=self.model_version,
                fallback=True,
                features=None if x is None else x[heuristic.index],
            )
        explored = False
        if coin < epsilon:
            near = np.flatnonzero(predicted <= self.explore_within * predicted[index])
            near = near[near != index]
            if len(near):
                index, explored = int(self.rng.choice(near)), True
        assert x is not None
        return Decision(
            index=index,
            worker_id=view.worker_ids[index],
            policy=NAME,
            scores=-predicted,
            explored=explored,
            predicted_ttft_ms=float(predicted[index]),
            model_version=self.model_version,
            features=x[index],
        )
