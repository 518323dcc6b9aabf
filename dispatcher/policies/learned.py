"""The `learned` policy: the calibrated engine model's TTFT estimate, corrected by a learned model only where
that model has proven better than the estimate, and per worker by the workers' own recent TTFT.

Every candidate gets the analytic estimate (lodestar.ttft_estimate, the feature `ttft_estimate_ms` of the
shared candidate matrix), so the policy routes well from the first request on a cluster it has never
seen. The learner trains the TTFT model (by default a ridge regression of the estimate's log error on the
GPU type's figures, learner/models/ridge_residual.py) and validates it against the estimate itself
(held-out log error, learner/trainer.py): a snapshot is used only once it predicts better than the physics
it starts from. There is no heuristic fallback and no random exploration (exploration must not cost the
tail): the estimate is the fallback (decisions labelled `learned/analytic`), and where the model would
extrapolate (a candidate's features outside its training range) the candidate gets the larger of the two
predictions, never the model's optimistic guess below the physics. A dispatcher-side WorkerCorrection
(dispatcher/policies/worker_correction.py) scales each worker's prediction by how much slower than
predicted it has recently been relative to the others (smoothed, dead-banded).

The policy minimises a cost, not the request's TTFT alone: a request's prefill also delays the requests
already on that worker (their next token, and the backlog queued behind it), so each candidate's cost is
its predicted TTFT plus the request's own prefill time there (lodestar.ttft_estimate.own_prefill_ms)
times a weighted count of the requests outstanding and queued on it. A long uncached prompt then goes
where it holds up the fewest others; a short or cached one, whose prefill is cheap, still goes where
its TTFT is least. Greedy per-request TTFT (the oracle's objective) loses to cache-affine heuristics on
small-KV pools with shared prefixes; this term is what closes that gap (docs/learning.md). The cost also
counts the whole engine iteration in progress where the predicted TTFT counts its expected half: a request
arriving just after a long decode step started waits all of it, and that is the tail, so between a cached
worker with a big batch and an equal one with a small batch the cost takes the small one.
"""

from __future__ import annotations

import random
from typing import Annotated

import numpy as np
from pydantic import Field

from dispatcher.policies.analytic import NAME as ANALYTIC
from dispatcher.policies.baselines.common import argmin_random_tie_array, outstanding_requests, require_workers
from dispatcher.policies.worker_correction import WorkerCorrection
from lodestar.cluster_view import ClusterView, Decision, GpuSetMemo, RequestInfo
from lodestar.features import (
    ESTIMATE_FEATURE,
    FEATURE_INDEX,
    GPU_FEATURES,
    PRIOR_FEATURES,
    candidate_matrix_with_cost_terms,
    gpu_matrix,
    prior_matrix,
)
from lodestar.snapshot import Snapshot
from lodestar.ttft_estimate import CostTerms, estimate_with_cost_terms_ms
from lodestar.ttft_model import TTFTModel

NAME = "learned"
_ESTIMATE_COLUMN = FEATURE_INDEX[ESTIMATE_FEATURE]
_GPU_ONLY = frozenset(FEATURE_INDEX[name] for name in GPU_FEATURES)
_PRIOR_ONLY = frozenset(FEATURE_INDEX[name] for name in PRIOR_FEATURES)
# How a snapshot is evaluated, chosen once per snapshot by the features it reads: the GPU's figures only (its
# own term and range check are per worker set, kept), those and the estimate (`prior_matrix`), or any
# feature (the full candidate matrix per decision).
_BY_GPU, _BY_PRIOR, _FULL = "gpu", "prior", "full"


def _gpu_terms(model: TTFTModel, gpu_types: tuple[str, ...], gpu_speed: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """A model of the GPU figures on these workers: its own term per worker and where it is out of its range
    (None when nowhere)."""
    x = gpu_matrix(gpu_types, gpu_speed)
    outside = model.out_of_range(x)
    return model.network_output(x), (outside if outside.any() else None)


class LearnedPolicy:
    """Least cost: the predicted TTFT (the analytic estimate, corrected by the learned model once it beats the
    estimate), plus the delay the request's own prefill adds to the requests already on the worker, plus the
    tail of the wait for the iteration in progress there."""

    name = NAME

    def __init__(
        self,
        require_validated: Annotated[bool, Field(description="use only snapshots that predicted better than the "
                                                             "estimate on held-out telemetry")] = True,
        check_range: Annotated[bool, Field(description="where a candidate's features are outside the snapshot's "
                                                       "training range, never predict below the estimate")] = True,
        worker_correction: Annotated[bool, Field(description="scale each worker's prediction by its recent TTFT "
                                                             "relative to the others (a slow host)")] = True,
        delay_outstanding: Annotated[float, Field(ge=0, le=10, description=(
            "routing cost per request outstanding on a worker, in units of this request's own prefill time "
            "there: the delay its prefill adds to each of them (a tail-aware cost, not the request's TTFT "
            "alone)"))] = 0.15,
        delay_queued: Annotated[float, Field(ge=0, le=10, description=(
            "routing cost per request queued on a worker and not yet started, in the same unit: a congested "
            "worker's backlog grows behind this prefill"))] = 0.5,
        iteration_risk: Annotated[float, Field(ge=0, le=4, description=(
            "routing cost per engine iteration in progress on a worker, in units of the half of it that the "
            "predicted TTFT does not count: 1 counts the whole iteration (the wait's worst case, which makes "
            "the tail), 0 only its expected half"))] = 1.0,
        seed: int = 0,
    ):
        self.delay_outstanding = delay_outstanding
        self.delay_queued = delay_queued
        self.iteration_risk = iteration_risk
        self.correction = WorkerCorrection() if worker_correction else None
        self.require_validated = require_validated
        self.check_range = check_range
        self.prior_label = f"{NAME}/{ANALYTIC}"
        self._rng = random.Random(seed)
        self.model: TTFTModel | None = None
        self._evaluation = _FULL
        self._gpu_part: GpuSetMemo[tuple[np.ndarray, np.ndarray | None]] | None = None

    def fallback_name(self) -> str:
        """What routes while no model is usable: the analytic estimate."""
        return ANALYTIC

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Swap in a new model (SnapshotError, model kept, if this build cannot evaluate it) and choose how to
        evaluate it from the features it reads: a model of the GPU figures (with the estimate as its base)
        costs a decision no model evaluation at all, one of the prior's features no full candidate matrix."""
        model = TTFTModel(snapshot)
        columns = set(model.columns.tolist())
        if columns <= _GPU_ONLY and model.base_column in (None, _ESTIMATE_COLUMN):
            self._evaluation = _BY_GPU
            self._gpu_part = GpuSetMemo(lambda types, speed: _gpu_terms(model, types, speed), maxsize=4)
        else:
            self._evaluation = _BY_PRIOR if columns <= _PRIOR_ONLY else _FULL
            self._gpu_part = None
        self.model = model

    @property
    def model_version(self) -> int:
        return 0 if self.model is None else self.model.version

    def _model_usable(self) -> bool:
        return self.model is not None and (self.model.validated or not self.require_validated)

    def _terms_needed(self) -> bool:
        return self.delay_outstanding > 0 or self.delay_queued > 0 or self.iteration_risk > 0

    def predict(self, request: RequestInfo, view: ClusterView
                ) -> tuple[np.ndarray, np.ndarray | None, bool, CostTerms | None]:
        """Predicted TTFT (ms) per candidate, the full candidate matrix if it was computed, whether the
        learned model made the prediction, and the estimate's cost terms per candidate (the request's own
        prefill time, the iteration in progress) when the cost uses them (one pass gives both)."""
        terms_needed = self._terms_needed()
        if not self._model_usable():
            estimate, terms = estimate_with_cost_terms_ms(request, view, terms=terms_needed)
            return estimate, None, False, terms
        model = self.model
        assert model is not None
        full: np.ndarray | None = None
        if self._evaluation is _BY_GPU:
            assert self._gpu_part is not None
            prior, terms = estimate_with_cost_terms_ms(request, view, terms=terms_needed)
            network, outside = self._gpu_part(view)
            pred = model.predict_from(network, prior)
        else:
            if self._evaluation is _BY_PRIOR:
                prior, terms = estimate_with_cost_terms_ms(request, view, terms=terms_needed)
                x = prior_matrix(view, prior)
            else:
                x, terms = candidate_matrix_with_cost_terms(request, view, terms=terms_needed)
                full, prior = x, x[:, _ESTIMATE_COLUMN]
            if self.check_range:
                pred, outside = model.predict_and_range(x)
                if not outside.any():
                    outside = None
            else:
                pred, outside = model.predict(x), None
        if self.check_range and outside is not None:
            pred = np.where(outside, np.maximum(pred, prior), pred)
        return pred, full, True, terms

    def extra_cost(self, view: ClusterView, terms: CostTerms | None) -> np.ndarray | float:
        """What the cost adds to each worker's predicted TTFT (ms), from the estimate's terms (`predict`; None
        only when every weight is 0): what routing the request there costs the requests already there (its own
        prefill time times the weighted count of requests outstanding and queued there), and the half of the
        iteration in progress that the prediction does not wait for, times `iteration_risk`."""
        if terms is None:
            return 0.0
        queued = np.maximum(view.inflight - view.running, view.waiting)
        weight = self.delay_outstanding * outstanding_requests(view) + self.delay_queued * queued
        cost = terms.own_prefill_ms * weight
        if self.iteration_risk:
            cost += (0.5 * self.iteration_risk) * terms.iteration_ms
        return cost

    def choose(self, request: RequestInfo, view: ClusterView) -> Decision:
        """The candidate with the least cost: predicted (and per-worker corrected) TTFT plus the delay its
        prefill adds to the requests already there and the tail of the iteration in progress; random among
        exact ties."""
        require_workers(view)
        pred, x, learned, terms = self.predict(request, view)
        ttft = pred if self.correction is None else pred * self.correction.factors(view)
        cost = ttft + self.extra_cost(view, terms)
        index = argmin_random_tie_array(cost, self._rng)
        if self.correction is not None:
            self.correction.routed(index, float(pred[index]))
        return Decision(index=index, worker_id=view.worker_ids[index], policy=NAME if learned else self.prior_label,
                        scores=-cost, predicted_ttft_ms=float(ttft[index]), model_version=self.model_version,
                        fallback=not learned, features=None if x is None else x[index])
