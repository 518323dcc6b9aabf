"""The campaign file (configs/campaign.yaml, sim/campaign/matrix.py) and the run cache (sim/campaign/runs.py):
the shipped matrix, policies found in the registries, clear errors for a bad file, and when a stored run
is reused."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sim.campaign import matrix
from sim.campaign.matrix import CONFIG, CampaignError, load_campaign, parse_campaign
from sim.campaign.runs import RunKey, counts_for_cache, describe, load_run, run_keys, save_run
from sim.policy_factory import PolicySpec


@pytest.fixture(scope="module")
def shipped() -> dict[str, Any]:
    return yaml.safe_load(CONFIG.read_text())


def test_the_shipped_matrix_is_the_campaign_of_the_results_doc(shipped: dict[str, Any]) -> None:
    full = parse_campaign(shipped)
    # The 16 scenarios the matrix held when it lived in the script, plus issue 11's 7 (failure modes, sustained
    # shared prefix, held-out cluster); 7 baselines, learned, 2 other families on 3 scenarios, oracle seed 1.
    assert len(full.scenarios) == 23 and len(run_keys(full.scenarios)) == 558
    assert all(sc.seeds == (1, 2, 3) for sc in full.scenarios)
    shifts = [sc for sc in full.scenarios if sc.shift_at_s is not None]
    assert [sc.workload for sc in shifts] == ["shift_slowdown", "shift_prefix_share"]
    assert all(sc.baselines == ("sglang_cache_aware", "lmetric", "gpu_speed_queue") and sc.duration_s == 600
               for sc in shifts)
    assert all(sc.baselines == full.baselines for sc in full.scenarios if sc not in shifts)
    assert {sc.slug for sc in full.scenarios if sc.families} == {
        "hetero_2h100_2a100_4l4__mooncake_conversation__r25", "hetero_4a30_4v100__mooncake_conversation__r14",
        "homo_8a30__mooncake_conversation__r16"}
    quick = parse_campaign(shipped, quick=True)
    assert [len(sc.runs) for sc in quick.scenarios] == [6, 2]
    assert load_campaign(quick=True) == quick


def test_baselines_and_families_come_from_the_registries(shipped: dict[str, Any],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # What the registries list joins the campaign by itself, minus the file's exclusions.
    monkeypatch.setattr(matrix, "heuristic_names", lambda: ["least_request", "lmetric", "random", "round_robin",
                                                            "sglang_cache_aware"])
    data = copy.deepcopy(shipped)
    data["policies"]["baselines"]["exclude"] = ["random", "round_robin"]
    data["policies"]["baselines"]["specs"] = [{"label": "lmetric_b", "policy": "lmetric"}]
    data["matrix"]["scenarios"] = [{"cluster": "homo_8a30", "workload": "shared_prefix", "rate": 12, "families": True}]
    c = parse_campaign(data)
    assert c.baselines == ("least_request", "lmetric", "sglang_cache_aware", "lmetric_b")
    assert c.scenarios[0].baselines == c.baselines
    assert c.scenarios[0].families == ("learned_mlp", "learned_river")  # all but the default (ridge_residual)
    assert c.specs["lmetric_b"] == PolicySpec("lmetric_b", "lmetric", {})


def test_adding_a_scenario_is_one_line(shipped: dict[str, Any]) -> None:
    data = copy.deepcopy(shipped)
    data["matrix"]["scenarios"].append({"cluster": "small_2a100_2l4", "workload": "multi_turn", "rate": 2})
    added = parse_campaign(data).scenarios[-1]
    assert added.slug == "small_2a100_2l4__multi_turn__r2"
    assert (added.duration_s, added.seeds, added.oracle) == (300, (1, 2, 3), "oracle")  # from the defaults
    assert len(added.runs) == (7 + 1) * 3 + 1


def mutate(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `data` with the value at dotted `path` set (list items by index)."""
    out = copy.deepcopy(data)
    *parents, last = path.split(".")
    node: Any = out
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


SC0 = {"cluster": "homo_8a30", "workload": "shared_prefix", "rate": 12}


@pytest.mark.parametrize(("path", "value", "message"), [
    ("matrix.scenarios.0", {**SC0, "rat": 3}, "matrix.scenarios.0.rat: Extra inputs are not permitted"),
    ("matrix.scenarios.0", {**SC0, "rate": -1}, "matrix.scenarios.0.rate: Input should be greater than 0"),
    ("matrix.scenarios.0", {**SC0, "rate": float("nan")}, "matrix.scenarios.0.rate"),
    ("matrix.scenarios.0", {**SC0, "cluster": "homo_9z"}, "no cluster file"),
    ("matrix.scenarios.0", {**SC0, "workload": "../../etc/passwd"}, "matrix.scenarios.0.workload: String should match"),
    ("matrix.scenarios.0", {**SC0, "seeds": [1, 1]}, "seeds repeat"),
    ("matrix.scenarios.0", {**SC0, "workload": "shift_slowdown", "shift_at_s": 140},
     "shift_at_s 140 is not an event time of shift_slowdown (events at 150)"),
    ("matrix.scenarios.0", {**SC0, "shift_at_s": 100}, "(events at none)"),
    ("matrix.scenarios.0", {**SC0, "baselines": ["lmetric", "oracle"]},
     "matrix.scenarios.0.baselines: ['oracle'] are not baselines of the campaign"),
    ("matrix.defaults.seed", [1], "defaults: unknown keys ['seed']"),
    ("policies.learned", {"label": "learned", "policy": "learnd"}, "unknown policy 'learnd'"),
    ("policies.learned", {"label": "learned", "policy": "learned", "params": {"check_range": "x"}}, "check_range"),
    ("policies.learned", {"label": "a b", "policy": "learned"}, "policies.learned.label: String should match"),
    ("policies.oracle", {"label": "lmetric", "policy": "oracle"}, "labels must be unique, ['lmetric'] repeat"),
    ("policies.baselines.exclude", ["lmetrik"], "policies.baselines: exclude names ['lmetrik']"),
    ("criteria.share_mean", 70, "criteria.share_mean: Input should be less than or equal to 1"),
])
def test_a_bad_campaign_file_says_what_and_where(shipped: dict[str, Any], path: str, value: Any,
                                                message: str) -> None:
    with pytest.raises(CampaignError) as err:
        parse_campaign(mutate(shipped, path, value))
    assert message in str(err.value)


def test_two_scenarios_with_one_folder_need_a_name(shipped: dict[str, Any]) -> None:
    data = copy.deepcopy(shipped)
    data["matrix"]["scenarios"] = [SC0, {**SC0, "duration_s": 600}]
    with pytest.raises(CampaignError, match=r"matrix.scenarios: \['homo_8a30__shared_prefix__r12'\] appear twice"):
        parse_campaign(data)
    data["matrix"]["scenarios"][1]["name"] = "long"
    assert [s.slug for s in parse_campaign(data).scenarios] == ["homo_8a30__shared_prefix__r12", "long"]


def test_a_file_that_is_not_yaml_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "campaign.yaml"
    bad.write_text("policies: [unclosed")
    with pytest.raises(CampaignError, match="not YAML"):
        load_campaign(bad)


# ------------------------------------------------------------------------------------------ run cache --

def stored_run(tmp_path: Path, shipped: dict[str, Any]) -> tuple[RunKey, dict[str, Any], dict[str, str]]:
    sc = parse_campaign(shipped, quick=True).scenarios[1]
    key = RunKey(sc, "learned", 1)
    run = describe(key, PolicySpec("learned", "learned", {"worker_correction": False}))
    source = {"commit": "c", "code": "digest", "dirty_files": ""}
    result = {"row": {"policy": "learned", "seed": 1}, "arrival_s": np.array([0.5, 1.0]),
              "ttft_s": np.array([0.1, 0.2]), "kind": np.array([3, 1], dtype=np.int8),
              "snapshots": [{"at_s": 1.0, "validated": True}]}
    save_run(tmp_path, key, run, source, result)
    return key, run, source


def test_a_stored_run_is_reused_only_while_what_it_is_and_its_code_are_unchanged(
        tmp_path: Path, shipped: dict[str, Any]) -> None:
    key, run, source = stored_run(tmp_path, shipped)
    assert (tmp_path / key.scenario.slug / "runs" / "learned-s1.json").is_file()
    again = load_run(tmp_path, key, run, source)
    assert again is not None and again.ttft_s.tolist() == [0.1, 0.2] and again.kind.tolist() == [3, 1]
    assert again.snapshots == [{"at_s": 1.0, "validated": True}]
    assert load_run(tmp_path, key, {**run, "params": {"worker_correction": True}}, source) is None
    assert load_run(tmp_path, key, {**run, "duration_s": 91.0}, source) is None
    assert load_run(tmp_path, key, run, {**source, "code": "other"}) is None
    assert load_run(tmp_path, RunKey(key.scenario, "learned", 2), run, source) is None


def test_the_cache_digest_leaves_out_what_only_post_processes_runs() -> None:
    for path in ("configs/campaign.yaml", "configs/campaign_extra.yaml", "sim/campaign/stats.py",
                 "sim/campaign_report.py"):
        assert not counts_for_cache(path)
    for path in ("sim/campaign/runs.py", "sim/simulator.py", "configs/workloads/shift_slowdown.yaml",
                 "dispatcher/policies/learned.py", "configs/lodestar.yaml"):
        assert counts_for_cache(path)
