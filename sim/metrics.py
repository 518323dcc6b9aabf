"""Serving metrics as SGLang's bench_serving defines them, from the simulator's completed requests.

TTFT: arrival to first token. TPOT: (latency - TTFT) / (output tokens - 1), for outputs longer than one
token. ITL: the gap between successive tokens of a request; the simulator reports it per engine step
(every decode token of a step waited that step's iteration time), so ITL statistics are weighted by
tokens. E2E: arrival to last token. Throughput: over the benchmark's span, first arrival to last
completion. Prefix hit rate: engine-cached prompt tokens / prompt tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np

from sim.records import CompletedRequest

PERCENTILES = (50, 90, 99)


def weighted_percentiles(values: np.ndarray, weights: np.ndarray, qs: Sequence[float]) -> list[float]:
    """Percentiles (0-100) of `values` repeated `weights` times (the lower value at ties, like 'inverted_cdf')."""
    if len(values) == 0 or weights.sum() <= 0:
        return [0.0 for _ in qs]
    order = np.argsort(values, kind="stable")
    v, cw = values[order], np.cumsum(weights[order])
    total = cw[-1]
    return [float(v[min(np.searchsorted(cw, q / 100.0 * total, side="left"), len(v) - 1)]) for q in qs]


def _stats(prefix: str, seconds: np.ndarray, weights: np.ndarray | None = None) -> dict[str, float]:
    ms = seconds * 1000.0
    if weights is None:
        weights = np.ones(len(ms))
    out: dict[str, float] = {}
    if len(ms) == 0 or weights.sum() <= 0:
        out[f"{prefix}_mean_ms"] = out[f"{prefix}_std_ms"] = 0.0
        for q in PERCENTILES:
            out[f"{prefix}_p{q}_ms"] = 0.0
        return out
    mean = float(np.average(ms, weights=weights))
    out[f"{prefix}_mean_ms"] = mean
    out[f"{prefix}_std_ms"] = float(np.sqrt(np.average((ms - mean) ** 2, weights=weights)))
    if np.all(weights == 1):
        for q, value in zip(PERCENTILES, np.percentile(ms, PERCENTILES), strict=True):
            out[f"{prefix}_p{q}_ms"] = float(value)
    else:
        for q, value in zip(PERCENTILES, weighted_percentiles(ms, weights, PERCENTILES), strict=True):
            out[f"{prefix}_p{q}_ms"] = value
    return out


def summarize(records: Sequence[CompletedRequest], itl_s: np.ndarray, itl_tokens: np.ndarray,
              routed_gpu_types: Sequence[str], gpu_types: Sequence[str], failed: int = 0) -> dict[str, object]:
    """bench_serving-style summary of one run.

    `itl_s`/`itl_tokens`: per engine step, the iteration time and the number of decode tokens it emitted.
    `routed_gpu_types`: the GPU type of every routing decision (for load share); `gpu_types`: the
    cluster's types, so a type that got nothing shows a share of 0.
    """
    n = len(records)
    arrivals = np.fromiter((r.arrival_s for r in records), np.float64, n)
    ttft = np.fromiter((r.ttft_s for r in records), np.float64, n)
    e2e = np.fromiter((r.e2e_s for r in records), np.float64, n)
    tpot = np.array([t for r in records if (t := r.tpot_s) is not None], dtype=np.float64)
    prompt = sum(r.prompt_tokens for r in records)
    cached = sum(r.cached_tokens for r in records)
    output = sum(r.completion_tokens for r in records)
    span = float(max(r.finished_s for r in records) - arrivals.min()) if n else 0.0
    routed = Counter(routed_gpu_types)
    total_routed = max(len(routed_gpu_types), 1)
    out: dict[str, object] = {
        "completed": n,
        "failed": failed,
        "duration_s": span,
        "request_throughput": n / span if span > 0 else 0.0,
        "input_throughput": prompt / span if span > 0 else 0.0,
        "output_throughput": output / span if span > 0 else 0.0,
        "total_input_tokens": prompt,
        "total_output_tokens": output,
        "prefix_hit_rate": cached / prompt if prompt else 0.0,
    }
    out.update(_stats("ttft", ttft))
    out.update(_stats("tpot", tpot))
    out.update(_stats("itl", itl_s, itl_tokens.astype(np.float64)))
    out.update(_stats("e2e", e2e))
    out["load_share"] = {t: routed.get(t, 0) / total_routed for t in dict.fromkeys(gpu_types)}
    return out
