"""`lodestar bench sim` end to end on a tiny scenario: results.json, plots, the baseline ratios."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from app.commands.bench import app


def tiny_scenario(tmp_path: Path) -> list[str]:
    """`sim` with a two-GPU cluster, a small shared-prefix workload and 8 s of arrivals."""
    cluster = tmp_path / "c.yaml"
    cluster.write_text(yaml.safe_dump({"name": "tiny", "workers": [{"gpu": "A100", "count": 1},
                                                                   {"gpu": "L4", "count": 1}]}))
    workload = tmp_path / "w.yaml"
    workload.write_text(yaml.safe_dump({"kind": "shared_prefix", "num_groups": 4, "system_prompt_len": 512,
                                        "question_len": 64, "output_len": 16, "rate": 4.0, "duration_s": 30}))
    return ["sim", "--cluster", str(cluster), "--workload", str(workload), "--duration", "8"]


def test_bench_sim_writes_results_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = CliRunner().invoke(app, [*tiny_scenario(tmp_path), "--policies", "round_robin,gpu_speed_queue",
                                      "--seeds", "1,2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())
    assert [(r["policy"], r["seed"]) for r in rows] == [("round_robin", 1), ("round_robin", 2),
                                                         ("gpu_speed_queue", 1), ("gpu_speed_queue", 2)]
    for r in rows:
        for key in ("completed", "ttft_mean_ms", "ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tpot_mean_ms",
                    "e2e_mean_ms", "prefix_hit_rate", "request_throughput", "output_throughput"):
            assert key in r
        assert r["completed"] > 0 and r["failed"] == 0
        assert set(r["load_share"]) == {"A100", "L4"}
        assert max(rr["ttft_mean_ms"] for rr in rows) >= r["ttft_mean_ms"] > 0
    # Identical arrivals: the same seed gives every policy the same requests.
    assert rows[0]["total_input_tokens"] == rows[2]["total_input_tokens"]
    assert rows[1]["total_input_tokens"] == rows[3]["total_input_tokens"]
    assert (out / "ttft_cdf.png").stat().st_size > 0 and (out / "ttft_over_time.png").stat().st_size > 0
    assert "x TTFT mean" in result.output
    table = (out / "results.md").read_text()
    assert "| round_robin |" in table and "gpu_speed_queue" in table


def test_two_variants_of_one_policy_run_side_by_side(tmp_path: Path) -> None:
    # Labels name the runs; --policy-params (JSON or YAML) gives each label its parameters.
    out = tmp_path / "out"
    params = '{"wide": {"cache_threshold": 0.0, "balance_abs_threshold": 1000}, "never": {"cache_threshold": 1.0}}'
    result = CliRunner().invoke(app, [*tiny_scenario(tmp_path), "--policies", "wide=sglang_cache_aware,never="
                                      "sglang_cache_aware", "--policy-params", params, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r["policy"]: r for r in json.loads((out / "results.json").read_text())}
    assert set(rows) == {"wide", "never"}
    # A threshold of 1 never routes by cache: the same arrivals, other decisions, fewer prefix hits.
    assert rows["wide"]["total_input_tokens"] == rows["never"]["total_input_tokens"]
    assert rows["wide"]["prefix_hit_rate"] > rows["never"]["prefix_hit_rate"]


def test_bad_policy_parameters_are_refused_before_any_run(tmp_path: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "400"})  # the error box on one line
    for policies, params, reason in [
        ("lmetric", '{"lmetric": {"x": 1}}', "policy 'lmetric': x: Extra inputs are not permitted"),
        ("learned", "{learned: {fallback: lmetric}}", "fallback: Extra inputs are not permitted"),
        ("learned_river", '{"learned_river": {"model": {"lr": 0}}}', "model family 'river': lr: Input should be"),
        ("lmetric", '{"other": {}}', "parameters for ['other'], which are not among the policies"),
        ("a=lmetric,a=random", None, "labels must be unique"),
        ("lmetric", "[1, 2]", "expected a mapping of policy label"),
    ]:
        args = [*tiny_scenario(tmp_path), "--policies", policies, "--out", str(tmp_path / "never")]
        result = runner.invoke(app, args + ([] if params is None else ["--policy-params", params]))
        assert result.exit_code == 2, result.output
        assert reason in result.output, result.output
    assert not (tmp_path / "never").exists()


def test_the_policy_list_names_every_policy(tmp_path: Path) -> None:
    from sim.policy_factory import available_policies

    result = CliRunner().invoke(app, ["policies"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.splitlines()[1:] if line.strip()]
    assert listed == available_policies()


def test_unknown_policy_is_refused(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["sim", "--cluster", "configs/clusters/homo_8a30.yaml", "--workload",
                                      "configs/workloads/shared_prefix.yaml", "--policies", "nope",
                                      "--out", str(tmp_path)])
    assert result.exit_code != 0
    assert "nope" in result.output


def test_missing_trace_is_reported_with_directions(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LODESTAR_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(app, ["sim", "--cluster", "configs/clusters/homo_8a30.yaml", "--workload",
                                      "configs/workloads/mooncake_conversation.yaml", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "kvcache-ai/Mooncake" in result.output and "mooncake_conversation.jsonl" in result.output
