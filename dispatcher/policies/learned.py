"""The `learned` policy: predict every candidate's TTFT from the current model snapshot, pick the least.

The snapshot comes from the learner (hot-swapped with `load_snapshot`, never per request). For each
request the shared candidate matrix (lodestar.features) is evaluated by lodestar.ttft_model with numpy
over all workers at once. A heuristic decides instead (default `gpu_speed_queue`, built by
`make_policy`) while there is no snapshot, while the snapshot is not validated on held-out telemetry,
and whenever the candidate the model picks has features outside the range the model was trained on
(with the snapshot's margin): its prediction there is extrapolation, possibly optimistic.
Exploration is epsilon-greedy with a decaying epsilon and a seeded RNG, but only among the candidates
the model rates close to the best (predicted TTFT within `explore_within` times the least): that is
where its ranking is uncertain and a sample is informative, and a request is never sent to a worker
the model knows to be swamped. The fallback heuristic does not explore. Explored decisions are flagged
so telemetry can tell them apart.
"""

from __future__ import annotations

import numpy as np

from dispatcher.policies.base import Policy, make_policy, register
from dispatcher.policies.snapshot_model import SnapshotModelMixin
from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.features import candidate_matrix
from lodestar.snapshot import Snapshot
from lodestar.ttft_model import TTFTModel

NAME = "learned"


@register(NAME)
class LearnedPolicy(SnapshotModelMixin):
    """Least predicted TTFT under the current snapshot, with exploration and a heuristic fallback."""

    name = NAME

    def __init__(
        self,
        snapshot: Snapshot | None = None,
        fallback: str | Policy = "gpu_speed_queue",
        epsilon_start: float = 0.05,
        epsilon_min: float = 0.002,
        epsilon_half_life: float = 2000.0,
        explore_within: float = 1.5,
        require_validated: bool = True,
        check_range: bool = True,
        seed: int = 0,
    ):
        if not 0.0 <= epsilon_min <= epsilon_start <= 1.0:
            raise ValueError("need 0 <= epsilon_min <= epsilon_start <= 1")
        if epsilon_half_life <= 0:
            raise ValueError("epsilon_half_life must be positive")
        if explore_within < 1.0:
            raise ValueError("explore_within must be >= 1")
        self.fallback: Policy = make_policy(fallback, seed=seed) if isinstance(fallback, str) else fallback
        self.fallback_name = f"{NAME}/{self.fallback.name}"
        self.epsilon_start = epsilon_start
        self.epsilon_min = epsilon_min
        self.epsilon_half_life = epsilon_half_life
        self.explore_within = explore_within
        self.require_validated = require_validated
        self.check_range = check_range
        self.rng = np.random.default_rng(seed)
        self.decisions = 0
        self.model: TTFTModel | None = None
        if snapshot is not None:
            self.load_snapshot(snapshot)

    @property
    def epsilon(self) -> float:
        """The exploration probability of the next decision (halves every `epsilon_half_life` decisions)."""
        decay = 0.5 ** (self.decisions / self.epsilon_half_life)
        return self.epsilon_min + (self.epsilon_start - self.epsilon_min) * decay

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The candidate with the least predicted TTFT, or the fallback's choice; maybe explore."""
        coin = self.rng.random()
        epsilon = self.epsilon
        self.decisions += 1
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
        explored = False
        if predicted is None:
            index, policy = self.fallback.choose(request, view).index, self.fallback_name
        else:
            policy = NAME
            if coin < epsilon:
                near = np.flatnonzero(predicted <= self.explore_within * predicted[index])
                near = near[near != index]
                if len(near):
                    index, explored = int(self.rng.choice(near)), True
        return Decision(
            index=index,
            worker_id=view.worker_ids[index],
            policy=policy,
            scores=predicted,
            explored=explored,
            predicted_ttft_ms=None if predicted is None else float(predicted[index]),
            model_version=self.model_version,
        )
