"""Trace replays: Mooncake (with prefix block ids) and Azure LLM inference 2023 (lengths only)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lodestar.hashing import trace_block_hashes
from sim.workloads.arrivals import ArrivalProcess
from sim.workloads.blocks import layered_block_hashes
from sim.workloads.request import WorkloadRequest
from sim.workloads.spec import AzureSpec, MooncakeSpec

MOONCAKE_BLOCK_TOKENS = 512

UPSTREAM = {
    "mooncake": "https://github.com/kvcache-ai/Mooncake (FAST25-release/traces/conversation_trace.jsonl, "
                "synthetic_trace.jsonl)",
    "azure": "https://github.com/Azure/AzurePublicDataset (data/AzureLLMInferenceTrace_conv.csv, "
             "AzureLLMInferenceTrace_code.csv)",
}


class TraceNotFound(FileNotFoundError):
    """A trace file is missing; the message says where it was looked for and where to get it."""


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One trace request: arrival offset (s, first request at 0), lengths, and block ids if known."""

    time_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()


def resolve_trace_path(path: Path, data_dir: Path, kind: str) -> Path:
    """`path` as given if absolute, else under `data_dir`; raise TraceNotFound if there is no such file."""
    full = path if path.is_absolute() else data_dir / path
    if not full.is_file():
        raise TraceNotFound(
            f"{kind} trace not found: {full}. Download it from {UPSTREAM[kind]} and place it there "
            f"(data_dir is {data_dir}; set LODESTAR_DATA_DIR to use another). Synthetic workloads "
            f"(kind: shared_prefix, multi_turn) need no data."
        )
    return full


@lru_cache(maxsize=8)
def read_mooncake(path: Path) -> tuple[TraceRow, ...]:
    """Rows of a Mooncake JSONL trace (timestamps in ms), sorted by time."""
    rows = []
    with path.open() as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                rows.append(TraceRow(r["timestamp"] / 1000.0, int(r["input_length"]), int(r["output_length"]),
                                     tuple(int(h) for h in r["hash_ids"])))
    rows.sort(key=lambda row: row.time_s)
    t0 = rows[0].time_s if rows else 0.0
    return tuple(TraceRow(r.time_s - t0, r.input_length, r.output_length, r.hash_ids) for r in rows)


@lru_cache(maxsize=8)
def read_azure(path: Path) -> tuple[TraceRow, ...]:
    """Rows of an Azure 2023 CSV trace (`TIMESTAMP,ContextTokens,GeneratedTokens`), sorted by time."""
    with path.open(newline="") as f:
        records = list(csv.DictReader(f))
    stamps = np.array([r["TIMESTAMP"].strip().replace(" ", "T") for r in records], dtype="datetime64[ns]")
    seconds = (stamps - stamps.min()).astype(np.float64) / 1e9 if len(stamps) else stamps
    rows = [TraceRow(float(t), int(r["ContextTokens"]), int(r["GeneratedTokens"]))
            for t, r in zip(seconds, records, strict=True)]
    rows.sort(key=lambda row: row.time_s)
    return tuple(rows)


def _arrival_times(spec: MooncakeSpec | AzureSpec, rows: tuple[TraceRow, ...],
                   rng: np.random.Generator) -> Iterator[float]:
    if spec.rate is None:
        for row in rows:
            yield row.time_s / spec.multiplier
        return
    process = ArrivalProcess(spec.rate, rng, spec.rate_changes(), spec.burstiness)
    for _ in rows:
        yield process.next()


def _output_tokens(spec: MooncakeSpec | AzureSpec, output_length: int) -> int:
    return max(1, round(output_length * spec.output_scale))


def mooncake_requests(spec: MooncakeSpec, path: Path, seed: int) -> Iterator[WorkloadRequest]:
    """Replay a Mooncake trace with the paper's knobs: each hash id becomes `tokens_per_block` tokens."""
    rows = read_mooncake(path)
    rng = np.random.default_rng([seed, 1])
    tpb = spec.tokens_per_block
    for i, (arrival, row) in enumerate(zip(_arrival_times(spec, rows, rng), rows, strict=False)):
        if spec.duration_s is not None and arrival >= spec.duration_s:
            return
        prompt_len = max(1, round(row.input_length * tpb / MOONCAKE_BLOCK_TOKENS))
        if spec.max_input_tokens is not None:
            prompt_len = min(prompt_len, spec.max_input_tokens)
        chain = tuple(trace_block_hashes(row.hash_ids[: prompt_len // tpb]))
        yield WorkloadRequest(f"r{i}", arrival, prompt_len, chain, tpb, _output_tokens(spec, row.output_length))


def azure_requests(spec: AzureSpec, path: Path, seed: int) -> Iterator[WorkloadRequest]:
    """Replay an Azure 2023 trace; without prefix information every request's blocks are unique."""
    rows = read_azure(path)
    rng = np.random.default_rng([seed, 1])
    keys = np.random.default_rng([seed, 2])
    for i, (arrival, row) in enumerate(zip(_arrival_times(spec, rows, rng), rows, strict=False)):
        if spec.duration_s is not None and arrival >= spec.duration_s:
            return
        prompt_len = max(1, row.input_length)
        if spec.max_input_tokens is not None:
            prompt_len = min(prompt_len, spec.max_input_tokens)
        key = int(keys.integers(1, 1 << 63))
        chain = layered_block_hashes([(key, prompt_len)], prompt_len, spec.block_tokens)
        yield WorkloadRequest(f"r{i}", arrival, prompt_len, chain, spec.block_tokens,
                              _output_tokens(spec, row.output_length))
