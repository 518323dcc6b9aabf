"""The learner service's pure parts: what telemetry is learned, refused (with why) or skipped; checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from learner.service import load_learner, validate_telemetry, write_checkpoint
from learner.trainer import Learner, LearnerConfig, make_learner
from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.features import FEATURE_NAMES, as_dict, candidate_matrix
from lodestar.limits import Limits
from lodestar.schemas import InvalidMessage, RoutingDecision, TelemetryEvent
from lodestar.settings import Settings

MAX_MS = 600_000.0
LIMITS = Limits(Settings())


def features() -> dict[str, float]:
    view = ClusterView.empty_like(["w"], ["A100"])
    return as_dict(candidate_matrix(RequestInfo("r", prompt_tokens=300), view)[0])


def event(**kw: object) -> TelemetryEvent:
    decision = RoutingDecision(worker_id="w", policy="p", features=features())
    return TelemetryEvent(**{"request_id": "r", "decision": decision, "gpu_type": "A100", "status": "ok",
                             "ttft_ms": 42.0, "e2e_ms": 900.0, **kw})


def test_a_good_event_becomes_a_sample() -> None:
    sample = validate_telemetry(event().to_bytes(), MAX_MS, LIMITS)
    assert sample is not None and sample.ttft_ms == 42.0
    assert sample.features.shape == (len(FEATURE_NAMES),) and sample.features[0] == 300.0


def test_failed_requests_are_valid_but_not_learned() -> None:
    assert validate_telemetry(event(status="error", ttft_ms=None).to_bytes(), MAX_MS, LIMITS) is None


def raw_with(**changes: object) -> bytes:
    body = json.loads(event().to_bytes())
    for path, value in changes.items():
        target = body
        *parents, leaf = path.split("__")
        for p in parents:
            target = target[p]
        if value is None:
            target.pop(leaf)
        else:
            target[leaf] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty message"),
        (b"{", "Invalid JSON"),
        (raw_with(schema_version=7), "schema_version"),
        (raw_with(ttft_ms=-3.0), "ttft_ms: Input should be greater than or equal to 0"),
        (raw_with(ttft_ms=None), "status ok without ttft_ms"),
        (raw_with(ttft_ms=MAX_MS * 2), "ttft_ms=1200000.0 is beyond max_latency_ms"),
        (raw_with(e2e_ms=1e7), "e2e_ms=10000000.0 is beyond"),
        (raw_with(e2e_ms=1e12), "e2e_ms: Input should be less than or equal to 86400000"),
        (raw_with(e2e_ms=float("nan")), "e2e_ms: Input should be a finite number"),
        (raw_with(decision__features__running=float("inf")), "decision.features.running: Input should be a finite"),
        (b"{" + b" " * 1_048_576 + b"}", "over the 1048576-byte limit"),
        (raw_with(decision__features__kv_usage=None), "features missing: kv_usage"),
        (raw_with(decision__features__running=-1.0), "finite and non-negative"),
        (raw_with(mystery=1), "mystery: Extra inputs are not permitted"),
    ],
)
def test_nonsense_is_refused_with_its_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        validate_telemetry(raw, MAX_MS, LIMITS)
    assert reason in info.value.reason


def trained_learner(n: int = 300) -> Learner:
    learner = make_learner("river", LearnerConfig(snapshot_every_events=50))
    rng = np.random.default_rng(0)
    row = np.array([features()[k] for k in FEATURE_NAMES])
    for i in range(n):
        x = row.copy()
        x[0] = rng.uniform(10, 4000)
        learner.observe(x, 5.0 + 0.05 * x[0], float(i))
    return learner


def test_checkpoint_round_trip_resumes_the_same_learner(tmp_path: Path) -> None:
    learner = trained_learner()
    snap = learner.maybe_snapshot(400.0)
    assert snap is not None and snap.version == 1
    path = tmp_path / "ckpt" / "learner.json"
    write_checkpoint(path, learner.checkpoint())
    assert [p.name for p in path.parent.iterdir()] == ["learner.json"]  # no temp file left behind
    resumed = load_learner(path, "river", LearnerConfig())
    assert resumed.n_seen == 300 and resumed.version == 1
    x = np.stack([np.array([features()[k] for k in FEATURE_NAMES])] * 2)
    np.testing.assert_allclose(resumed.model.predict(x), learner.model.predict(x))


def test_another_model_family_starts_afresh_but_keeps_the_version(tmp_path: Path) -> None:
    learner = trained_learner()
    learner.maybe_snapshot(400.0)
    path = tmp_path / "learner.json"
    write_checkpoint(path, learner.checkpoint())
    fresh = load_learner(path, "mlp", LearnerConfig())
    assert fresh.n_seen == 0 and fresh.version == 1 and fresh.model.family == "mlp"


def test_no_checkpoint_means_a_fresh_learner(tmp_path: Path) -> None:
    fresh = load_learner(tmp_path / "missing.json", "river", LearnerConfig())
    assert fresh.n_seen == 0 and fresh.version == 0
