"""The `learned_prior` policy: the calibrated engine model's TTFT estimate, corrected by a learned model
only where that model has proven better than the estimate.

Every candidate gets the analytic estimate (lodestar.ttft_estimate, the feature `ttft_estimate_ms` of the
shared candidate matrix), so the policy routes well from the first request on a cluster it has never
seen. The learner trains the TTFT model on the same features, the estimate among them, and validates it
against the estimate itself (held-out log error; `LearnerConfig.baseline_feature`): a snapshot is used
only once it predicts better than the physics it starts from. There is no heuristic fallback and no
random exploration (exploration must not cost the tail): the estimate is the fallback, and where the
model would extrapolate (a candidate's features outside its training range) the candidate gets the
larger of the two predictions, never the model's optimistic guess below the physics.
"""

from __future__ import annotations

import random

import numpy as np

from dispatcher.policies.base import register
from dispatcher.policies.baselines.common import argmin_random_tie, require_workers
from dispatcher.policies.snapshot_model import SnapshotModelMixin
from dispatcher.policies.worker_correction import WorkerCorrection
from lodestar.cluster_view import ClusterView, Decision, RequestInfo
from lodestar.features import FEATURE_INDEX, PRIOR_FEATURES, candidate_matrix, prior_matrix
from lodestar.snapshot import Snapshot
from lodestar.ttft_estimate import estimate_ttft_ms
from lodestar.ttft_model import TTFTModel

NAME = "learned_prior"
PRIOR = "ttft_estimate_ms"
_PRIOR_COLUMN = FEATURE_INDEX[PRIOR]
_PRIOR_ONLY = frozenset(FEATURE_INDEX[name] for name in PRIOR_FEATURES)


@register(NAME)
class LearnedPriorPolicy(SnapshotModelMixin):
    """Least predicted TTFT: the learned model where validated against the estimate, else the estimate."""

    name = NAME

    def __init__(self, snapshot: Snapshot | None = None, require_validated: bool = True, check_range: bool = True,
                 worker_correction: bool = True, seed: int = 0):
        self.correction = WorkerCorrection() if worker_correction else None
        self.require_validated = require_validated
        self.check_range = check_range
        self.prior_name = f"{NAME}/prior"
        self._rng = random.Random(seed)
        self.model: TTFTModel | None = None
        self._prior_only = False
        if snapshot is not None:
            self.load_snapshot(snapshot)

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Swap in a new model; note whether it reads only the prior's features (then no full matrix)."""
        super().load_snapshot(snapshot)
        assert self.model is not None
        self._prior_only = set(self.model.columns.tolist()) <= _PRIOR_ONLY

    def predict(self, request: RequestInfo, view: ClusterView) -> tuple[np.ndarray, bool]:
        """Predicted TTFT (ms) per candidate, and whether the learned model made it."""
        if not self._model_usable():
            return estimate_ttft_ms(request, view), False
        assert self.model is not None
        if self._prior_only:
            prior = estimate_ttft_ms(request, view)
            x = prior_matrix(view, prior)
        else:
            x = candidate_matrix(request, view)
            prior = x[:, _PRIOR_COLUMN]
        pred = self.model.predict(x)
        if self.check_range:
            outside = self.model.out_of_range(x)
            if outside.any():
                pred = np.where(outside, np.maximum(pred, prior), pred)
        return pred, True

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The candidate with the least predicted TTFT (random among exact ties)."""
        require_workers(view)
        pred, learned = self.predict(request, view)
        cost = pred if self.correction is None else pred * self.correction.factors(view)
        index = argmin_random_tie(cost.tolist(), self._rng)
        if self.correction is not None:
            self.correction.routed(index, float(pred[index]))
        return Decision(index=index, worker_id=view.worker_ids[index], policy=NAME if learned else self.prior_name,
                        scores=-cost, predicted_ttft_ms=float(cost[index]), model_version=self.model_version)
