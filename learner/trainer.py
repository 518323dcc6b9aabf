"""The I/O-free learning loop: replay buffer, retrain cadence, held-out validation, snapshot cadence.

The live learner service (telemetry from Kafka) and the simulator's telemetry hook (virtual time)
drive this same class, so the simulator measures what the live system does:

    learner = make_learner("mlp")
    learner.observe(features_row, observed_ttft_ms, now_s)   # per completed request
    snap = learner.maybe_snapshot(now_s)                     # a Snapshot every N events or T seconds

Every sample is first predicted by the current model (prequential: the online prediction error is
measured on data the model has not learned yet), then one in `holdout_every` goes to a held-out set
that is never trained on, and the rest feed the model: incremental models learn each sample at once;
batch models (MLP) are retrained at each snapshot on the recent samples plus a stratified sample of
older ones (strata: GPU speed x TTFT octave), as the paper does (it retrains every 1,000 samples; the
snapshot cadence here is every N events or T seconds, with a doubling warm-up from
`warmup_snapshot_every_events`, so the dispatcher leaves its cold-start fallback soon and early models,
learned from little data, are replaced soon).
A snapshot carries its held-out error and whether it passed validation; the dispatcher falls back to
a heuristic until one did. `checkpoint()` / `restore()` save and resume everything as JSON-able data.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Annotated, Any

import numpy as np
from pydantic import Field

from learner.models.base import OnlineTTFTModel
from learner.models.registry import make_model, model_from_state
from lodestar.features import ESTIMATE_FEATURE, FEATURE_INDEX, N_FEATURES
from lodestar.settings import LearnerSettings
from lodestar.snapshot import Snapshot, decode_array, encode_array

CHECKPOINT_FORMAT = 1


ESTIMATE_COLUMN = FEATURE_INDEX[ESTIMATE_FEATURE]


@dataclass(frozen=True)
class LearnerConfig:
    """Cadences, buffer sizes and validation thresholds of the learning loop."""

    snapshot_every_events: Annotated[int, Field(ge=1, description="publish a snapshot after this many events")] = 1000
    snapshot_every_s: Annotated[float, Field(gt=0, description="or after this many seconds")] = 30.0
    warmup_snapshot_every_events: Annotated[int, Field(ge=1, description=(
        "until a validated snapshot is out, publish this often (then doubling), so the dispatcher leaves "
        "its fallback sooner"))] = 100
    recent_capacity: Annotated[int, Field(ge=1, description="most recent samples replayed at a retrain")] = 5000
    diverse_capacity: Annotated[int, Field(ge=0, description=(
        "older samples replayed at a retrain, drawn evenly over GPU speed x TTFT octave strata (off by "
        "default: it over-weights rare TTFT octaves, which a correction of the estimate's typical error must "
        "not)"))] = 0
    diverse_per_stratum: Annotated[int, Field(ge=1, description="reservoir size of each stratum")] = 500
    holdout_every: Annotated[int, Field(ge=2, description="one sample in this many is held out, never trained "
                                                           "on")] = 10
    holdout_capacity: Annotated[int, Field(ge=1, description="held-out samples kept for validation")] = 1000
    min_train_samples: Annotated[int, Field(ge=0, description="a snapshot validates only after this many "
                                                              "trained samples")] = 100
    min_holdout_samples: Annotated[int, Field(ge=0, description="and this many held-out samples")] = 20
    max_holdout_log_mae: Annotated[float, Field(gt=0, description="and a held-out log error at most this")] = 0.6
    min_holdout_skill: Annotated[float, Field(le=1, description=(
        "and a skill (1 - its log error / the analytic estimate's) at least this: a model replaces the "
        "estimate only where it predicts better"))] = 0.05
    error_window: Annotated[int, Field(ge=1, description="samples of the rolling prequential error")] = 1000
    range_margin: Annotated[float, Field(ge=0, description=(
        "how far past its training range (fraction of the range) the dispatcher still trusts the model"))] = 0.25
    seed: int = 0

    @classmethod
    def from_settings(cls, settings: LearnerSettings, **overrides: Any) -> LearnerConfig:
        """The live snapshot cadence from settings (`learner.snapshot_every_*`), plus overrides."""
        return cls(**{"snapshot_every_events": settings.snapshot_every_events,
                      "snapshot_every_s": settings.snapshot_every_s,
                      "warmup_snapshot_every_events": settings.warmup_snapshot_every_events, **overrides})


class _Ring:
    """A fixed-capacity ring of (feature row, ttft) samples; oldest overwritten first."""

    def __init__(self, capacity: int):
        self.x = np.zeros((capacity, N_FEATURES))
        self.y = np.zeros(capacity)
        self.size = 0
        self.next = 0

    def add(self, x: np.ndarray, y: float) -> None:
        self.x[self.next] = x
        self.y[self.next] = y
        self.next = (self.next + 1) % len(self.y)
        self.size = min(self.size + 1, len(self.y))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.x[: self.size], self.y[: self.size]

    def state(self) -> dict[str, Any]:
        x, y = self.arrays()
        return {"x": encode_array(x), "y": encode_array(y), "next": self.next}

    def load(self, state: dict[str, Any]) -> None:
        x, y = decode_array(state["x"], "ring.x"), decode_array(state["y"], "ring.y")
        self.size = len(y)
        self.x[: self.size] = x.reshape(self.size, N_FEATURES)
        self.y[: self.size] = y
        self.next = int(state["next"])


class _StratifiedReservoir:
    """Per-stratum reservoir samples of everything seen, so rare regimes stay in the replay."""

    OVERFLOW = "other"

    def __init__(self, per_stratum: int, max_strata: int = 64):
        self.per_stratum = per_stratum
        self.max_strata = max_strata
        self.strata: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.seen: dict[str, int] = {}

    @staticmethod
    def key(x: np.ndarray, y: float) -> str:
        speed = round(float(x[FEATURE_INDEX["gpu_speed"]]), 3)
        return f"{speed}|{int(math.log2(1.0 + max(y, 0.0)))}"

    def add(self, x: np.ndarray, y: float, rng: np.random.Generator) -> None:
        k = self.key(x, y)
        if k not in self.strata and len(self.strata) >= self.max_strata:
            k = self.OVERFLOW
        if k not in self.strata:
            self.strata[k] = (np.zeros((self.per_stratum, N_FEATURES)), np.zeros(self.per_stratum))
            self.seen[k] = 0
        xs, ys = self.strata[k]
        n = self.seen[k]
        slot = n if n < self.per_stratum else int(rng.integers(0, n + 1))
        if slot < self.per_stratum:
            xs[slot] = x
            ys[slot] = y
        self.seen[k] = n + 1

    def sample(self, total: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Up to `total` samples drawn evenly across strata (all of a small stratum)."""
        keys = sorted(self.strata)
        if not keys:
            return np.zeros((0, N_FEATURES)), np.zeros(0)
        share = max(1, total // len(keys))
        xs, ys = [], []
        for k in keys:
            n = min(self.seen[k], self.per_stratum)
            take = np.arange(n) if n <= share else rng.choice(n, size=share, replace=False)
            xs.append(self.strata[k][0][take])
            ys.append(self.strata[k][1][take])
        return np.concatenate(xs), np.concatenate(ys)

    def state(self) -> dict[str, Any]:
        out = {}
        for k, (xs, ys) in self.strata.items():
            n = min(self.seen[k], self.per_stratum)
            out[k] = {"x": encode_array(xs[:n]), "y": encode_array(ys[:n]), "seen": self.seen[k]}
        return out

    def load(self, state: dict[str, Any]) -> None:
        self.strata, self.seen = {}, {}
        for k, s in state.items():
            xs, ys = np.zeros((self.per_stratum, N_FEATURES)), np.zeros(self.per_stratum)
            y = decode_array(s["y"], "stratum.y")
            xs[: len(y)] = decode_array(s["x"], "stratum.x").reshape(len(y), N_FEATURES)
            ys[: len(y)] = y
            self.strata[k] = (xs, ys)
            self.seen[k] = int(s["seen"])


def _log_errors(pred: np.ndarray, y: np.ndarray) -> np.ndarray:
    return np.abs(np.log1p(np.maximum(pred, 0.0)) - np.log1p(np.maximum(y, 0.0)))


class Learner:
    """Learns TTFT from (features, observed TTFT) samples and emits validated snapshots. No I/O."""

    def __init__(self, model: OnlineTTFTModel, config: LearnerConfig | None = None):
        self.model = model
        self.config = config or LearnerConfig()
        c = self.config
        self.rng = np.random.default_rng(c.seed)
        self.recent = _Ring(c.recent_capacity)
        self.diverse = _StratifiedReservoir(c.diverse_per_stratum)
        self.holdout = _Ring(c.holdout_capacity)
        self.n_seen = 0
        self.n_trained = 0
        self.since_retrain = 0
        self.version = 0
        self.events_since_snapshot = 0
        self.last_snapshot_s: float | None = None
        self.since_snapshot_trained = 0
        self.feature_min = np.full(N_FEATURES, np.inf)
        self.feature_max = np.full(N_FEATURES, -np.inf)
        self._pending_x: list[np.ndarray] = []
        self._pending_y: list[float] = []
        self.errors: deque[tuple[float, float, float]] = deque(maxlen=c.error_window)
        self.published_validated = False

    # -- learning ---------------------------------------------------------------------------------

    def observe(self, features_row: np.ndarray, observed_ttft_ms: float, now_s: float) -> None:
        """One completed request: the features of the chosen worker as routed, and its TTFT."""
        x = np.asarray(features_row, dtype=np.float64).reshape(N_FEATURES)
        y = float(observed_ttft_ms)
        if not (math.isfinite(y) and y >= 0.0 and np.all(np.isfinite(x))):
            raise ValueError(f"bad sample: ttft={observed_ttft_ms!r}, finite features={np.all(np.isfinite(x))}")
        if self.last_snapshot_s is None:
            self.last_snapshot_s = now_s
        self.n_seen += 1
        self.events_since_snapshot += 1
        if self.model.trained:
            self._pending_x.append(x)
            self._pending_y.append(y)
        if self.n_seen % self.config.holdout_every == 0:
            self.holdout.add(x, y)
            return
        np.minimum(self.feature_min, x, out=self.feature_min)
        np.maximum(self.feature_max, x, out=self.feature_max)
        self.recent.add(x, y)
        self.diverse.add(x, y, self.rng)
        self.n_trained += 1
        self.since_retrain += 1
        self.since_snapshot_trained += 1
        if self.model.incremental:
            self._score_pending()
            self.model.learn_one(x, y)

    def retrain(self) -> None:
        """Train the batch model on recent + stratified replayed samples (no-op for incremental)."""
        if self.model.incremental or self.since_retrain == 0:
            return
        self._score_pending()
        rx, ry = self.recent.arrays()
        dx, dy = self.diverse.sample(self.config.diverse_capacity, self.rng)
        self.model.learn_many(np.concatenate([rx, dx]), np.concatenate([ry, dy]))
        self.since_retrain = 0

    def _score_pending(self) -> None:
        """Prequential error: predict the samples that arrived since the model last changed."""
        if not self._pending_x:
            return
        pred = self.model.predict(np.stack(self._pending_x))
        y = np.array(self._pending_y)
        for p, t in zip(pred, y, strict=True):
            self.errors.append((abs(p - t) / max(t, 1e-9), abs(p - t), float(_log_errors(p, t))))
        self._pending_x.clear()
        self._pending_y.clear()

    # -- publishing -------------------------------------------------------------------------------

    def maybe_snapshot(self, now_s: float) -> Snapshot | None:
        """A new snapshot (batch models retrained first) once N events or T seconds passed since the last.

        During warm-up N is at most the number of events seen before the last snapshot (at least
        `warmup_snapshot_every_events`), and it is `warmup_snapshot_every_events` while the last
        published snapshot failed validation. Nothing is
        published while no sample was learned since the last snapshot.
        """
        c = self.config
        if self.since_snapshot_trained == 0:
            return None
        elapsed = now_s - (self.last_snapshot_s if self.last_snapshot_s is not None else now_s)
        # Warm-up: the interval doubles with the data (100, 200, 400, ...) up to N, so early models,
        # learned from little, are replaced soon; and it stays short while the last one failed validation.
        seen_before = self.n_seen - self.events_since_snapshot
        every = min(c.snapshot_every_events, max(c.warmup_snapshot_every_events, seen_before))
        if not self.published_validated:
            every = min(every, c.warmup_snapshot_every_events)
        if self.events_since_snapshot < every and elapsed < c.snapshot_every_s:
            return None
        self.retrain()
        return self.snapshot(now_s)

    def snapshot(self, now_s: float) -> Snapshot:
        """Validate the current model on the held-out set and export it with a new version."""
        self.version += 1
        self.events_since_snapshot = 0
        self.since_snapshot_trained = 0
        self.last_snapshot_s = now_s
        validation = self.validate()
        self.published_validated = validation["validated"]
        snap = self.model.to_snapshot(self.version)
        arrays = dict(snap.arrays)
        if self.n_trained > 0:
            arrays["feature_min"] = self.feature_min[list(_columns(snap))].copy()
            arrays["feature_max"] = self.feature_max[list(_columns(snap))].copy()
        meta = {
            **snap.meta,
            "validated": validation["validated"],
            "holdout": validation,
            "range_margin": self.config.range_margin,
            "n_seen": self.n_seen,
            "n_trained": self.n_trained,
            "online_error": self.online_error(),
            "created_at_s": float(now_s),
        }
        return replace(snap, arrays=arrays, meta=meta)

    def validate(self) -> dict[str, Any]:
        """Held-out error of the current model, against the analytic estimate's (the feature
        `ttft_estimate_ms`: what the learned policy routes with while no model is validated)."""
        c = self.config
        hx, hy = self.holdout.arrays()
        result: dict[str, Any] = {"samples": int(len(hy)), "validated": False}
        if len(hy) == 0 or not self.model.trained:
            return result
        pred = self.model.predict(hx)
        log_mae = float(np.mean(_log_errors(pred, hy)))
        baseline = float(np.mean(_log_errors(hx[:, ESTIMATE_COLUMN], hy)))
        skill = 1.0 - log_mae / baseline if baseline > 0 else 0.0
        result.update(
            log_mae=log_mae,
            mape=float(np.mean(np.abs(pred - hy) / np.maximum(hy, 1e-9))),
            mae_ms=float(np.mean(np.abs(pred - hy))),
            baseline_log_mae=baseline,
            skill=skill,
        )
        result["validated"] = bool(
            self.n_trained >= c.min_train_samples
            and len(hy) >= c.min_holdout_samples
            and log_mae <= c.max_holdout_log_mae
            and skill >= c.min_holdout_skill
        )
        return result

    def online_error(self) -> dict[str, float]:
        """Rolling prequential error over the last `error_window` predicted samples."""
        self._score_pending()
        if not self.errors:
            return {"samples": 0}
        e = np.array(self.errors)
        return {
            "samples": len(e),
            "mape": float(e[:, 0].mean()),
            "mae_ms": float(e[:, 1].mean()),
            "log_mae": float(e[:, 2].mean()),
        }

    # -- checkpoints ------------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to resume learning identically, as JSON-able data."""
        pend_x = np.stack(self._pending_x) if self._pending_x else np.zeros((0, N_FEATURES))
        return {
            "format": CHECKPOINT_FORMAT,
            "config": asdict(self.config),
            "model": self.model.state_dict(),
            "rng": self.rng.bit_generator.state,
            "recent": self.recent.state(),
            "diverse": self.diverse.state(),
            "holdout": self.holdout.state(),
            "counters": {
                "n_seen": self.n_seen, "n_trained": self.n_trained, "since_retrain": self.since_retrain,
                "since_snapshot_trained": self.since_snapshot_trained, "version": self.version,
                "events_since_snapshot": self.events_since_snapshot, "last_snapshot_s": self.last_snapshot_s,
                "published_validated": self.published_validated,
            },
            "feature_min": [None if not math.isfinite(v) else float(v) for v in self.feature_min],
            "feature_max": [None if not math.isfinite(v) else float(v) for v in self.feature_max],
            "pending": {"x": encode_array(pend_x), "y": list(self._pending_y)},
            "errors": [list(e) for e in self.errors],
        }

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Learner:
        """A learner that continues exactly where `checkpoint()` left off."""
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"unsupported learner checkpoint format {state.get('format')!r}")
        learner = cls(model_from_state(state["model"]), LearnerConfig(**state["config"]))
        learner.rng.bit_generator.state = state["rng"]
        learner.recent.load(state["recent"])
        learner.diverse.load(state["diverse"])
        learner.holdout.load(state["holdout"])
        for name, value in state["counters"].items():
            setattr(learner, name, value)
        learner.feature_min = np.array([np.inf if v is None else v for v in state["feature_min"]])
        learner.feature_max = np.array([-np.inf if v is None else v for v in state["feature_max"]])
        px = decode_array(state["pending"]["x"], "pending.x").reshape(-1, N_FEATURES)
        learner._pending_x = list(px)
        learner._pending_y = [float(v) for v in state["pending"]["y"]]
        learner.errors.extend(tuple(e) for e in state["errors"])
        return learner


def _columns(snap: Snapshot) -> list[int]:
    return [FEATURE_INDEX[n] for n in snap.feature_names]


def make_learner(family: str, config: LearnerConfig | None = None, *, seed: int | None = None,
                 model_params: Mapping[str, Any] | None = None) -> Learner:
    """A learner around a fresh model of the named family (learner.models.registry.model_families())."""
    return Learner(make_model(family, model_params, seed=seed), config)
