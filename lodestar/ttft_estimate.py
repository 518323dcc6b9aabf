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
attention cost assumes equal-length fresh prompts), when running requests will finish (the KV wait assumes
they are halfway through outputs as long as this request's, and is pessimistic about it), whether a prefix
the router's index matches is still in the engine's cache (the index holds a whole KV pool's worth of
blocks, the engine shares that pool with its running requests, so on a busy small-memory GPU some matches
are already evicted: the estimate is the expected TTFT over that risk), and a worker running slower than
its GPU type. The learned policy corrects it online (dispatcher/policies/learned_prior.py).
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
# Share of the running requests' remaining output that SGLang reserves in KV (its new_token_ratio decays
# from 0.7 to ~0.1 while a batch runs and jumps back up after a retraction); a middle value.
KV_RESERVE_RATIO = 0.5
# Probability that a prefix match of the router's index is already evicted from the engine, per unit of the
# worker's KV usage. Measured in the simulator (offline counterfactuals): 1% of matches on large-KV GPUs,
# 6-10% on A30s at 50-90% KV usage, ~36% on 8xA30 Mooncake (heavy churn); 0.3 x usage sits between, on
# the pessimistic side (a miss costs the whole prefill: tail risk).
STALE_MATCH_RATE = 0.3

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

    __slots__ = (*(f.removesuffix("_s") for f in _FIELDS), "full_chunk")

    def __init__(self, gpu_types: tuple[str, ...], model: str):
        rows = [gpu_coefficients(t, model) for t in gpu_types]
        for name in _FIELDS:
            arr = np.array([row[name] for row in rows], dtype=np.float64)
            arr.setflags(write=False)
            setattr(self, name.removesuffix("_s"), arr)
        self.full_chunk = _iteration_s(self, self.chunked_prefill_size, 1.0)  # a whole chunk, one sequence


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
    """An iteration of `tokens` tokens of which `seqs` sequences emit logits, without attention. The
    lm_head term is the plain max of its two bounds (the engine's smooth max differs by <1% of a step at
    the few sequences a prefill emits)."""
    return (c.fixed + tokens * c.per_token + _pnorm(tokens * c.gemm_flop, c.gemm_weight, c.gemm_p)
            + np.maximum(seqs * c.lm_flop, c.lm_weight) + seqs * c.sampler_seq)


def _decode_s(c: _Coefficients, n: np.ndarray, ctx: np.ndarray) -> np.ndarray:
    """One decode iteration of `n` sequences reading `ctx` context tokens (0 where n is 0)."""
    t = _iteration_s(c, n, n) + n * c.dec_seq + ctx * c.dec_ctx
    return np.where(n > 0, t, 0.0)


def _kv_wait_s(request: RequestInfo, view: ClusterView, total: np.ndarray, queued: np.ndarray,
               running: np.ndarray, used: np.ndarray, decode_step: np.ndarray) -> np.ndarray:
    """Wait for KV memory. SGLang admits a prefill only if its tokens plus the output it may still write
    fit beside what the running requests may still write (scaled by its new-token ratio); otherwise the
    request waits for running requests to finish. Outputs are taken to be as long as this request's
    (`max_new_tokens`), running ones halfway through. The wait is pessimistic on purpose: when at least one
    running request must finish first, it is half an output's decode steps (requests that started together
    finish together, and a retraction raises the reservation); a fraction of that for a partial overflow."""
    out = float(min(request.max_new_tokens, CLIP_MAX_NEW_TOKENS))
    half = 0.5 * out
    reserve = KV_RESERVE_RATIO * running * half
    need = total + (queued + 1.0) * out
    overflow = need + reserve - (view.max_kv_tokens - used)
    per_finish = used / np.maximum(running, 1.0) + KV_RESERVE_RATIO * half
    finishes = np.where((view.max_kv_tokens > 0) & (running > 0), np.maximum(overflow, 0.0) / per_finish, 0.0)
    steps = half * np.minimum(finishes, 1.0) + out * np.maximum(finishes - 1.0, 0.0) / (running + 1.0)
    return steps * decode_step


def estimate_ttft_ms(request: RequestInfo, view: ClusterView, model: str = DEFAULT_MODEL) -> np.ndarray:
    """Estimated TTFT (ms) of `request` on every worker of `view`, shape (n_workers,): the expected value
    over the risk that the matched prefix is no longer cached (then the whole prompt is prefilled)."""
    c = _coefficients(tuple(view.gpu_types), model)
    prompt = float(request.prompt_tokens)
    matched = np.minimum(view.matched_prefix_tokens, max(prompt - 1.0, 0.0))
    backlog = np.maximum(view.pending_prefill_tokens, 0.0)
    waiting = np.maximum(view.waiting, 0.0)
    # The decode batch: what the engine last reported running, or the router's own fresher count of the
    # requests it sent there and that have not finished (less those still waiting), whichever is larger.
    # Between two load snapshots many decisions read the same `running`; `inflight` moves with each, so
    # the decode step of a worker that was just given requests grows at once (no herding onto it).
    running = np.maximum(np.maximum(view.running, view.inflight - waiting), 0.0)
    kv_usage = np.clip(view.kv_usage, 0.0, 1.0)
    used = kv_usage * view.max_kv_tokens
    chunk = c.chunked_prefill_size
    queued = np.maximum(waiting, np.where(backlog > 0, 1.0, 0.0))
    mean_queued = backlog / np.maximum(waiting, 1.0)
    backlog_attn = backlog * (mean_queued + 1.0) * 0.5 * c.attn_flop
    # The iteration in progress: a prefill chunk if a backlog is queued, else a decode step; half of it left.
    decode_step = _decode_s(c, running, used)
    in_progress = 0.5 * np.where(backlog > 0, _iteration_s(c, np.minimum(backlog, chunk), 1.0), decode_step)

    # This request's own terms, as matched (row 0) and as a full miss (row 1) when anything matched.
    stale = matched.any()
    hit = np.stack((matched, np.zeros_like(matched))) if stale else matched[None, :]
    uncached = prompt - hit
    # Prefill of the backlog and then this request, in chunked iterations of up to `chunk` tokens; each
    # iteration emits logits for the requests it completes (the queued ones spread over the iterations).
    total = backlog + uncached
    full = np.ceil(total / chunk) - 1.0
    last = total - full * chunk
    seqs = (queued + 1.0) / (full + 1.0)
    prefill = full * (c.full_chunk + (seqs - 1.0) * c.sampler_seq) + _iteration_s(c, last, seqs)
    own_attn = np.maximum(uncached * (hit + (uncached + 1.0) * 0.5) * c.attn_flop, prompt * c.attn_key)
    kv_wait = _kv_wait_s(request, view, total, queued, running, used, decode_step)
    ttft = 1000.0 * (in_progress + backlog_attn + prefill + own_attn + kv_wait)
    if not stale:
        return ttft[0]
    p = STALE_MATCH_RATE * kv_usage * (matched > 0)
    return ttft[0] + p * (ttft[1] - ttft[0])
