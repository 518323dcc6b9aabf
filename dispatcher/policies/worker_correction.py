"""Per-worker correction of predicted TTFTs from each worker's own reported recent TTFT.

A worker running slower than its GPU type says (a throttled GPU, a noisy neighbour, a bad host) is
invisible to the analytic estimate and to a model of GPU types. But each worker publishes a moving
average of the TTFTs it served (`recent_ttft_ms`, EWMA alpha 0.2 per request), and the router knows what
it predicted for the requests it sent there: the ratio of the two is that worker's bias. Only the ratio
*relative to the other workers* is kept (a bias common to all does not change a ranking), smoothed in
time with `time_constant_s` (a snapshot read by many decisions must not swing them all: herding), and
applied only beyond a dead band of `dead_band` in log space, so the noise of single TTFTs never moves
traffic. A worker that stops receiving requests keeps its correction, decaying towards none with
`forget_s`, so it is tried again eventually.
"""

from __future__ import annotations

import math

import numpy as np

from lodestar.cluster_view import ClusterView

PREDICTION_ALPHA = 0.2  # the same smoothing as the worker's recent-TTFT average
MIN_ROUTED = 5  # predictions averaged before a worker's ratio is trusted


class WorkerCorrection:
    """Multiplicative per-worker factors on predicted TTFTs (1.0 until evidence says otherwise).

    State is kept in arrays aligned with the last view's worker list and carried over by id when the
    list changes (workers joining or leaving), so a decision costs a few vector operations, and none when
    no time has passed since the last one (the decisions of one dispatcher batch share their view's clock:
    with nothing to advance, the factors are the last ones)."""

    def __init__(self, time_constant_s: float = 5.0, dead_band: float = 0.2, forget_s: float = 60.0,
                 max_factor: float = 8.0):
        if time_constant_s <= 0 or forget_s <= 0 or dead_band < 0 or max_factor < 1:
            raise ValueError("need time_constant_s > 0, forget_s > 0, dead_band >= 0, max_factor >= 1")
        self.time_constant_s = time_constant_s
        self.dead_band = dead_band
        self.forget_s = forget_s
        self.max_log = math.log(max_factor)
        self._ids: list[str] = []
        self._pred = np.zeros(0)  # EWMA of (uncorrected) predictions for requests routed to the worker
        self._routed = np.zeros(0)
        self._log_factor = np.zeros(0)
        self._last_ms: float | None = None
        self._factors: np.ndarray | None = None  # what `factors` returned last, for the same workers

    def _align(self, ids: list[str]) -> bool:
        """Carry the state over to `ids` (by worker id); whether the worker list changed."""
        if ids == self._ids:
            return False
        old = {wid: i for i, wid in enumerate(self._ids)}
        take = np.array([old.get(wid, -1) for wid in ids], dtype=np.intp)
        have = take >= 0

        def carry(arr: np.ndarray) -> np.ndarray:
            out = np.zeros(len(ids))
            out[have] = arr[take[have]]
            return out

        self._pred, self._routed, self._log_factor = carry(self._pred), carry(self._routed), carry(self._log_factor)
        self._ids = list(ids)
        self._factors = None
        return True

    def factors(self, view: ClusterView) -> np.ndarray:
        """The factor for every worker of `view` now (and advance the smoothing to `view.now_ms`)."""
        changed = self._align(view.worker_ids)
        dt_s = 0.0 if self._last_ms is None else max(view.now_ms - self._last_ms, 0.0) / 1000.0
        self._last_ms = view.now_ms
        if dt_s == 0.0 and not changed and self._factors is not None:
            # No time to advance: the smoothing follows by 0 and forgets by a factor of 1, so the log factors
            # and therefore the factors are the last ones (finite recent TTFTs: the view's are validated).
            return self._factors
        known = (self._routed >= MIN_ROUTED) & (self._pred > 0) & (view.recent_ttft_ms > 0)
        g = self._log_factor
        count = np.count_nonzero(known)
        if count == 0 and not g.any():
            self._factors = np.ones(len(g))  # nothing measured yet: no correction, nothing to advance
            return self._factors
        if count >= 2:
            raw = np.log(np.where(known, view.recent_ttft_ms, 1.0) / np.where(known, self._pred, 1.0))
            raw -= np.partition(raw[known], count // 2)[count // 2]  # the (upper) median worker has no correction
            follow = 1.0 - math.exp(-dt_s / self.time_constant_s)
            g = np.where(known, g + follow * (raw - g), g * math.exp(-dt_s / self.forget_s))
        else:
            g = g * math.exp(-dt_s / self.forget_s)
        self._log_factor = np.minimum(np.maximum(g, -self.max_log), self.max_log)
        excess = np.abs(self._log_factor)
        excess -= self.dead_band
        np.maximum(excess, 0.0, out=excess)
        self._factors = np.exp(np.copysign(excess, self._log_factor))
        return self._factors

    def routed(self, index: int, predicted_ms: float) -> None:
        """This router sent a request to worker `index` of the last view, with this (uncorrected) prediction."""
        prev = self._pred[index]
        first = self._routed[index] == 0
        self._pred[index] = predicted_ms if first else prev + PREDICTION_ALPHA * (predicted_ms - prev)
        self._routed[index] += 1
