"""Workload loaders: trace replay knobs, synthetic generators, arrival re-timing and scheduled events."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from sim.workloads import TraceNotFound, load_workload, parse_workload_spec, workload_from_spec


def _write_mooncake(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    traces = tmp_path / "traces"
    traces.mkdir()
    _write_mooncake(traces / "mc.jsonl", [
        {"timestamp": 0, "input_length": 1100, "output_length": 100, "hash_ids": [0, 1, 2]},
        {"timestamp": 500, "input_length": 1500, "output_length": 7, "hash_ids": [0, 1, 3]},
        {"timestamp": 2000, "input_length": 600, "output_length": 1, "hash_ids": [4, 5]},
        {"timestamp": 4000, "input_length": 40_000, "output_length": 50, "hash_ids": list(range(10, 89))},
    ])
    rows = [{"timestamp": 250 * i, "input_length": 512, "output_length": 10, "hash_ids": [i]} for i in range(4000)]
    _write_mooncake(traces / "long.jsonl", rows)
    (traces / "az.csv").write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "2023-11-16 18:15:51.2224670,879,55\n"
    )
    return tmp_path


def _mooncake(data_dir: Path, **kw) -> list:
    spec = parse_workload_spec({"kind": "mooncake", "path": "traces/mc.jsonl", **kw})
    return list(workload_from_spec(spec, data_dir).requests(seed=1))


def test_mooncake_native_scale_keeps_lengths_blocks_and_timestamps(data_dir: Path) -> None:
    reqs = _mooncake(data_dir)
    assert [r.prompt_len for r in reqs] == [1100, 1500, 600, 40_000]
    assert [r.max_new_tokens for r in reqs] == [100, 7, 1, 50]
    assert [r.arrival_s for r in reqs] == [0.0, 0.5, 2.0, 4.0]
    assert [len(r.block_hashes) for r in reqs] == [2, 2, 1, 78]  # whole 512-token blocks only
    assert all(r.block_tokens == 512 for r in reqs)
    assert reqs[0].block_hashes == reqs[1].block_hashes  # ids [0, 1] shared
    assert reqs[2].block_hashes[0] != reqs[0].block_hashes[0]


def test_mooncake_paper_recipe_rescales_caps_and_halves(data_dir: Path) -> None:
    reqs = _mooncake(data_dir, tokens_per_block=50, max_input_tokens=1000, output_scale=0.5)
    assert [r.prompt_len for r in reqs] == [round(1100 * 50 / 512), round(1500 * 50 / 512), round(600 * 50 / 512),
                                            1000]
    assert [len(r.block_hashes) for r in reqs] == [2, 2, 1, 20]
    assert [r.max_new_tokens for r in reqs] == [50, 4, 1, 25]  # at least one token
    assert reqs[0].block_hashes == reqs[1].block_hashes


def test_mooncake_multiplier_and_duration_act_on_original_timestamps(data_dir: Path) -> None:
    reqs = _mooncake(data_dir, multiplier=2.0, duration_s=1.5)
    assert [r.arrival_s for r in reqs] == [0.0, 0.25, 1.0]


def test_poisson_retiming_reaches_the_target_rate(data_dir: Path) -> None:
    spec = parse_workload_spec({"kind": "mooncake", "path": "traces/long.jsonl", "rate": 20.0})
    times = np.array([r.arrival_s for r in workload_from_spec(spec, data_dir).requests(seed=3)])
    gaps = np.diff(times)
    assert len(times) == 4000
    assert np.all(gaps >= 0)
    assert len(times) / times[-1] == pytest.approx(20.0, rel=0.05)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.1)  # exponential gaps


def test_rate_event_changes_the_arrival_rate(data_dir: Path) -> None:
    spec = parse_workload_spec({"kind": "mooncake", "path": "traces/long.jsonl", "rate": 10.0, "duration_s": 200,
                                "events": [{"kind": "rate", "at_s": 100, "rate": 30.0}]})
    times = np.array([r.arrival_s for r in workload_from_spec(spec, data_dir).requests(seed=3)])
    before, after = np.sum(times < 100), np.sum(times >= 100)
    assert before / 100 == pytest.approx(10.0, rel=0.15)
    assert after / 100 == pytest.approx(30.0, rel=0.15)


def test_rate_override_retimes_a_trace(data_dir: Path) -> None:
    spec = parse_workload_spec({"kind": "mooncake", "path": "traces/long.jsonl", "multiplier": 3.0})
    w = workload_from_spec(spec, data_dir).with_rate(40.0)
    times = np.array([r.arrival_s for r in w.requests(seed=1)])
    assert len(times) / times[-1] == pytest.approx(40.0, rel=0.05)
    assert w.with_rate(None) is w


def test_same_seed_same_stream_other_seed_other_stream(data_dir: Path) -> None:
    spec = parse_workload_spec({"kind": "shared_prefix", "rate": 5.0, "duration_s": 20, "share": 0.5})
    w = workload_from_spec(spec, data_dir)
    assert list(w.requests(7)) == list(w.requests(7))
    assert list(w.requests(7)) != list(w.requests(8))


def test_missing_trace_names_the_path_and_the_upstream(tmp_path: Path) -> None:
    spec = parse_workload_spec({"kind": "mooncake", "path": "traces/nope.jsonl"})
    with pytest.raises(TraceNotFound) as err:
        workload_from_spec(spec, tmp_path)
    assert str(tmp_path / "traces" / "nope.jsonl") in str(err.value)
    assert "kvcache-ai/Mooncake" in str(err.value)
    spec = parse_workload_spec({"kind": "azure", "path": "nope.csv"})
    with pytest.raises(TraceNotFound, match="Azure/AzurePublicDataset"):
        workload_from_spec(spec, tmp_path)


def test_azure_blocks_are_unique_and_timestamps_relative(data_dir: Path) -> None:
    spec = parse_workload_spec({"kind": "azure", "path": "traces/az.csv", "block_tokens": 16})
    reqs = list(workload_from_spec(spec, data_dir).requests(seed=1))
    assert [r.prompt_len for r in reqs] == [374, 396, 879]
    assert [r.max_new_tokens for r in reqs] == [44, 109, 55]
    assert reqs[0].arrival_s == 0.0
    assert reqs[1].arrival_s == pytest.approx(4.314579)
    assert [len(r.block_hashes) for r in reqs] == [374 // 16, 396 // 16, 879 // 16]
    all_blocks = [h for r in reqs for h in r.block_hashes]
    assert len(set(all_blocks)) == len(all_blocks)


def test_sglang_gsp_defaults() -> None:
    w = load_workload(Path(__file__).parents[2] / "configs" / "workloads" / "shared_prefix.yaml")
    reqs = list(w.requests(seed=1))
    assert len(reqs) == 64 * 16
    assert {r.prompt_len for r in reqs} == {2048 + 128}
    assert {r.max_new_tokens for r in reqs} == {256}
    groups = Counter(r.block_hashes[2048 // r.block_tokens - 1] for r in reqs)
    assert len(groups) == 64 and set(groups.values()) == {16}
    # The block holding the question is unique to each request.
    assert len({r.block_hashes[2048 // r.block_tokens] for r in reqs}) == len(reqs)
    # Shuffled: the first 16 requests are not all one group.
    assert len({r.block_hashes[0] for r in reqs[:16]}) > 1


def test_preset_fields_can_be_overridden() -> None:
    spec = parse_workload_spec({"kind": "shared_prefix", "preset": "preble_loogle", "num_groups": 3})
    assert spec.num_groups == 3 and spec.system_prompt_len == 9000 and spec.popularity == "zipf"
    with pytest.raises(ValidationError, match="unknown preset"):
        parse_workload_spec({"kind": "shared_prefix", "preset": "nope"})


def test_prefix_share_event_changes_the_shared_fraction() -> None:
    spec = parse_workload_spec({
        "kind": "shared_prefix", "num_groups": 8, "system_prompt_len": 256, "question_len": 64, "output_len": 8,
        "share": 0.05, "rate": 50.0, "duration_s": 80, "block_tokens": 32,
        "events": [{"kind": "prefix_share", "at_s": 40, "share": 0.5}],
    })
    reqs = list(workload_from_spec(spec).requests(seed=2))
    first = Counter(r.block_hashes[0] for r in reqs)
    shared = np.array([first[r.block_hashes[0]] > 1 for r in reqs])
    times = np.array([r.arrival_s for r in reqs])
    assert shared[times < 40].mean() == pytest.approx(0.05, abs=0.02)
    assert shared[times >= 40].mean() == pytest.approx(0.5, abs=0.05)


def test_slowdown_events_are_handed_to_the_simulator() -> None:
    spec = parse_workload_spec({"kind": "shared_prefix", "events": [
        {"kind": "slowdown", "at_s": 60, "worker": "a30-1", "factor": 2.0},
        {"kind": "slowdown", "at_s": 10, "worker": 0, "factor": 3.0}]})
    w = workload_from_spec(spec)
    assert [(e.at_s, e.worker, e.factor) for e in w.slowdowns] == [(10, 0, 3.0), (60, "a30-1", 2.0)]


def test_multi_turn_context_grows_within_a_session() -> None:
    spec = parse_workload_spec({"kind": "multi_turn", "session_rate": 2.0, "duration_s": 120, "think_time_s": 5.0,
                                "system_prompt_len": 300, "num_system_prompts": 2, "block_tokens": 16})
    reqs = list(workload_from_spec(spec).requests(seed=4))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:], strict=False))
    sessions = defaultdict(list)
    for r in reqs:
        sessions[r.session_id].append(r)
    multi = [turns for turns in sessions.values() if len(turns) > 1]
    assert multi
    for turns in multi:
        for prev, cur in zip(turns, turns[1:], strict=False):
            assert cur.prompt_len > prev.prompt_len + prev.max_new_tokens
            assert cur.block_hashes[: len(prev.block_hashes)] == prev.block_hashes
            # The answer's blocks continue the chain, and the next turn's prompt holds them.
            answered = prev.block_hashes + prev.output_block_hashes
            assert len(answered) == (prev.prompt_len + prev.max_new_tokens) // 16
            assert cur.block_hashes[: len(answered)] == answered
    # Sessions opening with the same system prompt share its whole blocks, and nothing more.
    firsts = Counter(turns[0].block_hashes[300 // 16 - 1] for turns in sessions.values())
    assert len(firsts) == 2
    assert len({turns[0].block_hashes[300 // 16] for turns in sessions.values()}) == len(sessions)


def test_invalid_combinations_are_rejected() -> None:
    with pytest.raises(ValidationError, match="not both"):
        parse_workload_spec({"kind": "mooncake", "path": "x", "rate": 2.0, "multiplier": 2.0})
    with pytest.raises(ValidationError, match="no prefix-share knob"):
        parse_workload_spec({"kind": "mooncake", "path": "x", "events": [{"kind": "prefix_share", "at_s": 1,
                                                                          "share": 0.5}]})
    with pytest.raises(ValidationError, match="set `rate`"):
        parse_workload_spec({"kind": "azure", "path": "x", "events": [{"kind": "rate", "at_s": 1, "rate": 3}]})
    with pytest.raises(ValidationError):
        parse_workload_spec({"kind": "shared_prefix", "bogus": 1})
