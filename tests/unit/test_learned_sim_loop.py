"""The learner in the simulator's telemetry loop: snapshots at the cadence, signed, swapped into the policy."""

from __future__ import annotations

import re

import numpy as np
import pytest

from dispatcher.policies.learned import LearnedPolicy
from learner.trainer import LearnerConfig, make_learner
from lodestar.cluster_view import Decision, RequestInfo
from lodestar.features import FEATURE_INDEX, N_FEATURES
from lodestar.params import ParamsError
from lodestar.snapshot import SigningKey, SnapshotError
from sim.cluster import ClusterSpec
from sim.learning_loop import LearningLoop
from sim.policy_factory import PolicySpec, build_sim_policy, learned_families
from sim.records import CompletedRequest
from sim.simulator import Simulator
from sim.workloads import parse_workload_spec, workload_from_spec


def record(k: int, rng: np.random.Generator) -> CompletedRequest:
    x = np.abs(rng.normal(size=N_FEATURES)) * 10.0
    x[FEATURE_INDEX["gpu_speed"]] = 1.0
    ttft_s = (5.0 + 0.5 * x[FEATURE_INDEX["backlog_tokens_per_speed"]]) / 1000.0
    t = k * 0.05
    return CompletedRequest(RequestInfo(f"r{k}", 100), Decision(0, "w0", "first"), "A100", x, 0, t, t + ttft_s,
                            t + ttft_s + 0.1, 100, 0, 10, "stop")


def test_loop_publishes_signed_snapshots_into_the_policy() -> None:
    policy = LearnedPolicy()
    cfg = LearnerConfig(snapshot_every_events=200, snapshot_every_s=1e9, warmup_snapshot_every_events=200)
    loop = LearningLoop(make_learner("river", cfg), policy, SigningKey("sim", b"s" * 32))
    rng = np.random.default_rng(0)
    for k in range(1000):
        rec = record(k, rng)
        loop.observe(rec)
        assert loop.tick(rec.finished_s) is None  # the policy is updated in place
    assert [s["version"] for s in loop.snapshots] == [1, 2, 3, 4, 5]
    assert policy.model_version == 5 and policy.model is not None and policy.model.validated


def test_records_without_features_are_skipped() -> None:
    loop = LearningLoop(make_learner("river"), LearnedPolicy())
    rec = record(0, np.random.default_rng(0))
    rec.features = None
    loop.observe(rec)
    assert loop.learner.n_seen == 0


def test_an_empty_key_is_refused_before_any_snapshot() -> None:
    with pytest.raises(SnapshotError, match="empty"):
        LearningLoop(make_learner("river"), LearnedPolicy(), SigningKey("sim", b""))


def test_each_loop_signs_with_a_key_of_its_own() -> None:
    one, two = (LearningLoop(make_learner("river"), LearnedPolicy()) for _ in range(2))
    assert len(one.key.secret) == 32 and one.key.secret != two.key.secret


@pytest.mark.parametrize("name", sorted(learned_families()))
def test_learned_policy_learns_inside_a_simulation(name: str) -> None:
    cluster = ClusterSpec.model_validate({"workers": [{"gpu": "A100", "count": 1}, {"gpu": "L4", "count": 1}]})
    spec = parse_workload_spec({"kind": "shared_prefix", "preset": "sglang_gsp", "rate": 10.0, "duration_s": 60,
                                "num_groups": 16, "prompts_per_group": 32, "output_len": 16})
    # every snapshot used, validated or not, so that the test sees the policy follow the loop's snapshots
    params = {"require_validated": False, "learner": {"snapshot_every_s": 5.0}}
    setup = build_sim_policy(PolicySpec("l", name, params), seed=1)
    assert isinstance(setup.policy, LearnedPolicy) and isinstance(setup.sink, LearningLoop)
    assert setup.sink.learner.config.snapshot_every_s == 5.0
    assert setup.sink.learner.model.family == learned_families()[name]
    result = Simulator(cluster, setup.policy, seed=1, sink=setup.sink).run(workload_from_spec(spec).requests(1))
    policies = {(r.decision.policy, r.decision.fallback) for r in result.records}
    assert policies == {("learned/analytic", True), ("learned", False)}  # the estimate until a snapshot, then the model
    assert setup.policy.model_version >= 2
    versions = [r.decision.model_version for r in sorted(result.records, key=lambda r: r.arrival_s)]
    assert versions == sorted(versions) and versions[0] == 0


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"fallback": "round_robin"}, "fallback: Extra inputs are not permitted"),
        ({"learner": {"snapshot_every_events": 0}}, "learner section: snapshot_every_events: Input should be greater"),
        ({"learner": {"seed": 3}}, "learner section: seed: Extra inputs are not permitted"),
        ({"model": {"no_such_knob": 1}}, "no_such_knob: Extra inputs are not permitted"),
        ({"check_range": "sometimes"}, "check_range: Input should be a valid boolean"),
    ],
)
def test_bad_learning_parameters_are_refused_before_the_run(params: dict, reason: str) -> None:
    with pytest.raises(ParamsError, match=re.escape(reason)):
        build_sim_policy(PolicySpec("l", "learned", params), seed=1)
