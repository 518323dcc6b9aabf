"""Analytic TTFT estimate per candidate worker, from the calibrated engine model's per-GPU coefficients.

A router that knows each GPU's prefill speed can estimate, before any telemetry, how long a request
would wait for its first token on each worker: the rest of the iteration in progress, then the prefill
backlog queued ahead of it and its own uncached tokens in chunked-prefill iterations (SGLang runs
prefill batches before decode steps, so that backlog is what it waits for), plus a wait for KV memory
when the backlog and the request do not fit in the free KV cache. Every term is the engine model's own
step-time formula (docs/engine-model.md) evaluated on what the router sees (ClusterView): pending prefill
tokens, waiting and running requests, KV usage, the matched prefix and the GPU type. The coefficients
come from `engine_coefficients.json` beside this module, exported from sim/engine/calibration.json by
scripts/export_engine_coefficients.py (a test keeps them equal to the engine model's).

What the router cannot see makes this an estimate, not a simulation: the composition of the queue (its
attention cost assumes equal-length fresh prompts), how much of the queued prompts the engine has cached
(the engine reports queued prompts whole), when running requests will finish (the KV wait assumes they
are halfway through outputs as long as this request's), and a worker running slower than its GPU type.
The learned policy corrects it online (dispatcher/policies/prior_guarded.py).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.hardware import REFERENCE_GPU, gpu

COEFFICIENTS_FILE = Path(__file__).with_name("engine_coefficients.json")
DEFAULT_MODEL = "llama-3.1-8b"
# SGLang clips a request's max_new_tokens at this in its KV admission estimate.
CLIP_MAX_NEW_TOKENS = 4096
# Share of the running requests' remaining output that SGLang reserves in KV (new_token_ratio decays
# from 0.7 to ~0.1 while the batch runs); a middle value.
RUNNING_RESERVE_RATIO = 0.3

_FIELDS = ("fixed_s", "per_token_s", "gemm_flop_s", "gemm_weight_s", "gemm_p", "lm_flop_s", "lm_weight_s",
           "sampler_seq_s", "attn_flop_s", "attn_key_s", "dec_seq_s", "dec_ctx_s", "chunked_prefill_size")


@lru_cache(maxsize=1)
def _table() -> dict[str, dict[str, dict[str, float]]]:
    with open(COEFFICIENTS_FILE, encoding="utf-8") as f:
        return json.load(f)["models"]


def gpu_coefficients(gpu_type: str, model: str = DEFAULT_MODEL) -> dict[str, float]:
    """One GPU's coefficients for `model`; an unknown or uncalibrated GPU gets the reference GPU's."""
    table = _table()
    per_gpu = table.get(model.lower()) or table[DEFAULT_MODEL]
    try:
        name = gpu(gpu_type).name
    except KeyError:
        name = REFERENCE_GPU
    return per_gpu.get(name) or per_gpu[REFERENCE_GPU]


class _Coefficients:
    """Per-worker coefficient arrays for one tuple of GPU types (built once per cluster shape)."""

    __slots__ = tuple(f.removesuffix("_s") for f in _FIELDS)

    def __init__(self, gpu_types: tuple[str, ...], model: str):
        rows = [gpu_coefficients(t, model) for t in gpu_types]
        for name in _FIELDS:
            arr = np.array([row[name] for row in rows], dtype=np.float64)
            arr.setflags(write=False)
            setattr(self, name.removesuffix("_s"), arr)


@lru_cache(maxsize=64)
def _coefficients(gpu_types: tuple[str, ...], model: str) -> _Coefficients:
    return _Coefficients(gpu_types, model)


def _pnorm(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """The engine model's smooth maximum (a^p + b^p)^(1/p) of non-negative times, elementwise."""
    hi = np.maximum(a, b)
    lo = np.minimum(a, b)
    safe = np.where(hi > 0, hi, 1.0)
    return hi * (1.0 + (lo / safe) ** p) ** (1.0 / p)


def _iteration_s(c: _Coefficients, tokens: np.ndarray, seqs: float | np.ndarray) -> np.ndarray:
    """An iteration of `tokens` tokens of which `seqs` sequences emit logits, without attention."""
    return (c.fixed + tokens * c.per_token + _pnorm(tokens * c.gemm_flop, c.gemm_weight, c.gemm_p)
            + _pnorm(seqs * c.lm_flop, c.lm_weight, c.gemm_p) + seqs * c.sampler_seq)


def _decode_s(c: _Coefficients, n: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """One decode iteration of `n` sequences reading `ctx` context tokens (0 where n is 0)."""
    t = _iteration_s(c, n, n) + n * c.dec_seq + ctx * c.dec_ctx
    return np.where(n > 0, t, 0.0)


def estimate_ttft_ms(request: RequestInfo, view: ClusterView, model: str = DEFAULT_MODEL) -> np.ndarray:
    """Estimated TTFT (ms) of `request` on every worker of `view`, shape (n_workers,)."""
    c = _coefficients(tuple(view.gpu_types), model)
    prompt = float(request.prompt_tokens)
    matched = np.minimum(view.matched_prefix_tokens, max(prompt - 1.0, 0.0))
    uncached = prompt - matched
    backlog = np.maximum(view.pending_prefill_tokens, 0.0)
    waiting = np.maximum(view.waiting, 0.0)
    running = np.maximum(view.running, 0.0)
    chunk = c.chunked_prefill_size

    # Prefill of the backlog and then this request, in chunked iterations of up to `chunk` tokens.
    total = backlog + uncached
    full = np.ceil(total / chunk) - 1.0
    last = total - full * chunk
    queued = np.maximum(waiting, np.where(backlog > 0, 1.0, 0.0))
    # Each iteration emits logits for the requests it completes: spread the queued ones over the iterations.
    seqs = (queued + 1.0) / (full + 1.0)
    prefill = full * _iteration_s(c, chunk, seqs) + _iteration_s(c, last, seqs)
    own_attn = np.maximum(uncached * (matched + (uncached + 1.0) * 0.5) * c.attn_flop,
                          (matched + uncached) * c.attn_key)
    mean_queued = backlog / np.maximum(waiting, 1.0)
    backlog_attn = backlog * (mean_queued + 1.0) * 0.5 * c.attn_flop

    # The iteration in progress: a prefill chunk if a backlog is queued, else a decode step; half of it left.
    used = np.clip(view.kv_usage, 0.0, 1.0) * view.max_kv_tokens
    decode_step = _decode_s(c, running, used)
    in_progress = 0.5 * np.where(backlog > 0, _iteration_s(c, np.minimum(backlog, chunk), 1.0), decode_step)

    # KV admission: the backlog, this request and its output reservation must fit beside the running
    # requests' reservation; the overflow waits for running requests to finish and free their KV.
    out_tokens = float(min(request.max_new_tokens, CLIP_MAX_NEW_TOKENS))
    free = view.max_kv_tokens - used - RUNNING_RESERVE_RATIO * running * out_tokens
    overflow = np.where(view.max_kv_tokens > 0, np.maximum(total + out_tokens - free, 0.0), 0.0)
    kv_wait = overflow * (0.5 * out_tokens) * decode_step / np.maximum(used, 1.0)

    return 1000.0 * (in_progress + prefill + own_attn + backlog_attn + kv_wait)
