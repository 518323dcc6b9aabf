"""The Learner loop: cadences, held-out validation, prequential error, checkpoint/restore."""

from __future__ import annotations

import json

import numpy as np
import pytest

from learner.models.registry import model_families
from learner.trainer import Learner, LearnerConfig, make_learner
from lodestar.features import FEATURE_INDEX, N_FEATURES
from lodestar.ttft_model import TTFTModel


def stream(n: int, seed: int = 0) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = np.abs(rng.normal(size=N_FEATURES)) * 20.0
        x[FEATURE_INDEX["gpu_speed"]] = rng.choice([0.5, 2.0])
        x[FEATURE_INDEX["backlog_tokens_per_speed"]] = rng.uniform(0, 10_000) / x[FEATURE_INDEX["gpu_speed"]]
        out.append((x, 10.0 + 0.3 * x[FEATURE_INDEX["backlog_tokens_per_speed"]]))
    return out


SMALL_MLP = {"hidden": (16,), "epochs": 2}


def feed(learner: Learner, samples: list[tuple[np.ndarray, float]], t0: float = 0.0, dt: float = 0.01) -> list:
    snaps = []
    for k, (x, y) in enumerate(samples):
        now = t0 + k * dt
        learner.observe(x, y, now)
        snap = learner.maybe_snapshot(now)
        if snap is not None:
            snaps.append(snap)
    return snaps


def test_no_snapshot_before_the_cadence_and_none_without_new_samples() -> None:
    learner = make_learner("mlp", LearnerConfig(warmup_snapshot_every_events=100), model_params=SMALL_MLP)
    assert feed(learner, stream(50)) == [] and not learner.model.trained
    assert learner.maybe_snapshot(1e9) is not None  # T seconds passed: retrain and publish
    assert learner.maybe_snapshot(2e9) is None  # nothing new learned since


def test_event_cadence_versions_and_ranges() -> None:
    cfg = LearnerConfig(snapshot_every_events=200, snapshot_every_s=1e9)
    learner = make_learner("river", cfg)
    snaps = feed(learner, stream(1000))
    assert [s.version for s in snaps] == [1, 2, 3, 4, 5, 6]
    # warm-up: every 100 events until one validated (20 held-out samples are needed), then every 200
    assert [s.meta["n_seen"] for s in snaps] == [100, 200, 400, 600, 800, 1000]
    assert [s.validated for s in snaps] == [False, True, True, True, True, True]
    last = snaps[-1]
    assert last.meta["n_seen"] == 1000 and last.meta["n_trained"] == 900  # one in ten held out
    model = TTFTModel(last)
    assert model.feature_min is not None and model.feature_max is not None
    assert np.all(model.feature_min <= model.feature_max)


def test_time_cadence() -> None:
    cfg = LearnerConfig(snapshot_every_events=10_000, snapshot_every_s=5.0)
    learner = make_learner("river", cfg)
    snaps = feed(learner, stream(300), dt=0.1)  # 30 s of traffic
    assert len(snaps) == 5  # a snapshot every 5 s after the first sample at t=0 (t=5, 10, ..., 25)
    assert [round(s.meta["created_at_s"], 1) for s in snaps] == [5.0, 10.0, 15.0, 20.0, 25.0]


def test_validation_passes_on_learnable_data_and_fails_on_noise() -> None:
    learner = make_learner("river", LearnerConfig(snapshot_every_events=500))
    snap = feed(learner, stream(1500))[-1]
    assert snap.validated and snap.meta["holdout"]["skill"] > 0.5
    noisy = make_learner("river", LearnerConfig(snapshot_every_events=500))
    rng = np.random.default_rng(1)
    noise = [(x, float(rng.lognormal(5.0, 1.0))) for x, _ in stream(1500)]
    assert not feed(noisy, noise)[-1].validated


def test_mlp_retrains_at_each_snapshot_on_replayed_samples() -> None:
    cfg = LearnerConfig(snapshot_every_events=300, snapshot_every_s=1e9, warmup_snapshot_every_events=300,
                        recent_capacity=200, diverse_capacity=100)
    learner = make_learner("mlp", cfg, model_params=SMALL_MLP)
    trained_at, learned = [], []
    for k, (x, y) in enumerate(stream(1000)):
        learner.observe(x, y, k * 0.01)
        before = learner.model.n_learned
        if learner.maybe_snapshot(k * 0.01) is not None:
            trained_at.append(learner.n_seen)
            learned.append(learner.model.n_learned - before)
    assert trained_at == [300, 600, 900]
    # each retrain sees the recent ring (200) plus up to 100 replayed from the strata
    assert all(200 < n <= 300 for n in learned)


def test_online_error_is_prequential_and_shrinks() -> None:
    learner = make_learner("river", LearnerConfig(error_window=300))
    samples = stream(3000)
    feed(learner, samples[:300])
    early = learner.online_error()["log_mae"]
    feed(learner, samples[300:])
    late = learner.online_error()
    assert late["samples"] == 300 and late["log_mae"] < early


def test_bad_samples_are_refused() -> None:
    learner = make_learner("river")
    x = stream(1)[0][0]
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            learner.observe(x, bad, 0.0)
    with pytest.raises(ValueError):
        learner.observe(np.full(N_FEATURES, np.nan), 10.0, 0.0)


@pytest.mark.parametrize("family", model_families())
def test_checkpoint_restore_resumes_identically(family: str) -> None:
    cfg = LearnerConfig(snapshot_every_events=150, warmup_snapshot_every_events=60, holdout_every=7)
    learner = make_learner(family, cfg)
    samples = stream(900, seed=3)
    feed(learner, samples[:433])
    state = json.loads(json.dumps(learner.checkpoint()))
    resumed = Learner.restore(state)
    a = feed(learner, samples[433:], t0=10.0)
    b = feed(resumed, samples[433:], t0=10.0)
    assert len(a) == len(b) > 0
    for sa, sb in zip(a, b, strict=True):
        assert sa.version == sb.version and sa.meta == sb.meta
        assert sa.arrays.keys() == sb.arrays.keys()
        for k in sa.arrays:
            np.testing.assert_array_equal(sa.arrays[k], sb.arrays[k])
    assert learner.online_error() == resumed.online_error()


def test_unknown_learner_name() -> None:
    with pytest.raises(KeyError, match="unknown model family 'svm'"):
        make_learner("svm")


def test_validation_against_the_analytic_prior() -> None:
    """A model is validated only if it predicts better than the analytic estimate (what the learned policy
    routes with otherwise) on held-out samples."""
    rng = np.random.default_rng(5)
    prior = FEATURE_INDEX["ttft_estimate_ms"]

    def prior_stream(scale: float) -> list[tuple[np.ndarray, float]]:
        out = []
        for x, _ in stream(1500, seed=2):
            x[prior] = rng.uniform(20.0, 2000.0)
            out.append((x, scale * x[prior] * float(rng.lognormal(0.0, 0.05))))
        return out

    cfg = LearnerConfig(snapshot_every_events=500)
    exact = feed(make_learner("river", cfg), prior_stream(1.0))[-1]  # the prior is already right
    assert not exact.validated and exact.meta["holdout"]["skill"] < cfg.min_holdout_skill
    biased = feed(make_learner("river", cfg), prior_stream(3.0))[-1]  # the prior is 3x off: learnable
    assert biased.validated and biased.meta["holdout"]["skill"] > 0.5
