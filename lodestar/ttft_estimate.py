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
attention cost assumes equal-length fresh prompts), the running requests' contexts (a decode step reads every
sequence's KV, shared prefixes included, so the estimate takes each running request as long as this request's
prompt plus half the worker's typical output, or the KV usage where that is more), which iteration the engine
is in (with a prefill backlog queued, the longer of a decode step and a prefill chunk), when running requests
will finish (the KV wait assumes they are halfway through outputs as long as the worker's recent completions,
and is pessimistic about it), whether a prefix the router's index matches is still in the engine's cache (the
index holds a whole KV pool's worth of blocks, the engine shares that pool with its running requests, so on a
busy small-memory GPU some matches are already evicted: the estimate is the expected TTFT over that risk), and
a worker running slower than its GPU type. The learned policy corrects it online (dispatcher/policies/learned.py).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lodestar.cluster_view import ClusterView, GpuSetMemo, RequestInfo
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
    """Per-worker coefficient arrays for one tuple of GPU types (built once per cluster shape), with the
    constant parts of the step-time formula folded in advance: the decision's cost is numpy's per-call
    overhead, so every term below is as few array operations as the formula allows."""

    __slots__ = (*(f.removesuffix("_s") for f in _FIELDS), "inv_p", "weight_p", "prefill_fixed", "full_chunk",
                 "decode_per_seq", "half_attn_flop")

    def __init__(self, gpu_types: tuple[str, ...], model: str):
        rows = [gpu_coefficients(t, model) for t in gpu_types]
        for name in _FIELDS:
            setattr(self, name.removesuffix("_s"), np.array([row[name] for row in rows], dtype=np.float64))
        self.inv_p = 1.0 / self.gemm_p
        self.weight_p = self.gemm_weight ** self.gemm_p
        # A prefill iteration emits logits for a few sequences: lm_head reads its weights once (at <100
        # sequences its FLOPs stay under that floor), plus the fixed per-iteration latencies.
        self.prefill_fixed = self.fixed + self.lm_weight
        self.full_chunk = _prefill_iteration_s(self, self.chunked_prefill_size,
                                               _gemm_s(self, self.chunked_prefill_size))
        self.decode_per_seq = self.per_token + self.sampler_seq + self.dec_seq
        self.half_attn_flop = 0.5 * self.attn_flop


# Per model: the coefficient arrays of a view's GPU types, built once per worker set (lodestar.cluster_view).
_COEFFICIENTS: dict[str, GpuSetMemo[_Coefficients]] = {}


def _coefficients(view: ClusterView, model: str) -> _Coefficients:
    memo = _COEFFICIENTS.get(model)
    if memo is None:
        memo = _COEFFICIENTS.setdefault(model, GpuSetMemo(lambda types, _speed: _Coefficients(types, model)))
    return memo(view)


def _gemm_s(c: _Coefficients, tokens: np.ndarray | float) -> np.ndarray:
    """Linear layers on `tokens` tokens (one row per worker, or several rows of workers): the engine model's
    smooth max (a^p + b^p)^(1/p) of the FLOP time and the weight-read time."""
    out = np.multiply(tokens, c.gemm_flop)
    out **= c.gemm_p
    out += c.weight_p
    out **= c.inv_p
    return out


def _prefill_iteration_s(c: _Coefficients, tokens: np.ndarray | float, gemm: np.ndarray) -> np.ndarray:
    """A prefill iteration of `tokens` new tokens, without attention (its few sampled sequences cost <0.1%);
    `gemm` is `_gemm_s(c, tokens)`."""
    out = c.prefill_fixed + tokens * c.per_token
    out += gemm
    return out


_HIT_AND_MISS = np.array([[1.0], [0.0]])  # row 0: the prefix as matched; row 1: nothing cached (stale match)


class CostTerms(NamedTuple):
    """Per worker (ms), from the estimate's pass: what a routing cost adds to the predicted TTFT."""

    own_prefill_ms: np.ndarray  # the request's own prefill there (`own_prefill_ms`): what it delays others by
    iteration_ms: np.ndarray  # the engine iteration in progress there; the estimate waits for half of it


def estimate_ttft_ms(request: RequestInfo, view: ClusterView, model: str = DEFAULT_MODEL) -> np.ndarray:
    """Estimated TTFT (ms) of `request` on every worker of `view` (see `estimate_with_cost_terms_ms`)."""
    return estimate_with_cost_terms_ms(request, view, model, terms=False)[0]


def cached_tokens(request: RequestInfo, view: ClusterView) -> np.ndarray:
    """The request's matched prefix per worker as an engine can use it: an engine always recomputes at least
    the last prompt token (SGLang caps cached at prompt - 1)."""
    return np.minimum(view.matched_prefix_tokens, max(float(request.prompt_tokens) - 1.0, 0.0))


def estimate_with_cost_terms_ms(request: RequestInfo, view: ClusterView, model: str = DEFAULT_MODEL,
                                terms: bool = True, cached: np.ndarray | None = None
                                ) -> tuple[np.ndarray, CostTerms | None]:
    """Estimated TTFT (ms) of `request` on every worker of `view`, and (with `terms`) its own prefill time
    there as `own_prefill_ms` computes it and the iteration in progress, from one pass. TTFT and own prefill
    are the expected value over the risk that the matched prefix is no longer cached (then the whole prompt
    is prefilled). `cached` is `cached_tokens(request, view)` when the caller has it already.

    TTFT = half the iteration in progress (a decode step of the running batch; with a prefill backlog
           queued, the longer of that and a prefill chunk: the backlog may be waiting for the decode step
           to end or be in its prefill, the router cannot tell which)
         + the backlog's and this request's uncached tokens in chunked prefill iterations, with attention
         + a wait for KV memory when they and their outputs do not fit (see below).
    A decode step reads every running sequence's KV, a shared prefix once per sequence: the context it
    reads is the larger of the KV in use and the running count times this request's prompt plus half the
    worker's typical output (the running requests' own lengths are not visible; a pool of shared system
    prompts uses little KV for many long contexts).
    KV admission: SGLang admits a prefill only if its tokens plus the output it may still write fit beside
    what the running requests may still write (scaled by its new-token ratio, KV_RESERVE_RATIO here);
    otherwise it waits for running requests to finish. This request's output is its `max_new_tokens`; the
    outputs of the requests running and queued on a worker are as long as that worker's recent completions
    (`recent_output_tokens`), or as this request's where none finished yet; running ones are halfway through.
    The wait is pessimistic on purpose: once a running request must finish first it is half an output's
    decode steps (requests that started together finish together, and a retraction raises the reservation),
    a fraction of that for a partial overflow.

    Evaluated on stacked rows (the decode batch with the prefill chunk in progress; the matched and missed
    rows of the request's total and own tokens) so that each term is one numpy call however many rows use
    it: a decision's cost is numpy's per-call overhead, not the arithmetic.
    """
    c = _coefficients(view, model)
    n = view.size
    prompt = float(request.prompt_tokens)
    out = float(min(request.max_new_tokens, CLIP_MAX_NEW_TOKENS))
    others_out = _others_output_tokens(view, out)
    backlog = view.pending_prefill_tokens
    # The decode batch: what the engine last reported running, or the router's own fresher count of the
    # requests it sent there and that have not finished (less those still waiting), whichever is larger.
    # Between two load snapshots many decisions read the same `running`; `inflight` moves with each, so
    # the decode step of a worker that was just given requests grows at once (no herding onto it).
    # Row 1: the prefill chunk in progress when a backlog is queued. Both go through the linear layers.
    batch = np.empty((2, n))
    running = np.maximum(view.running, view.inflight - view.waiting, out=batch[0])
    chunk = np.minimum(backlog, c.chunked_prefill_size, out=batch[1])
    gemm = _gemm_s(c, batch)
    kv_usage = np.minimum(view.kv_usage, 1.0)
    used = kv_usage * view.max_kv_tokens
    busy = backlog > 0
    decoding = running > 0

    # Worker state terms (shape n).
    half = 0.5 * others_out
    decode_step = c.fixed + running * c.decode_per_seq
    decode_step += gemm[0]
    decode_step += np.maximum(running * c.lm_flop, c.lm_weight)
    decode_step += np.maximum(used, running * (prompt + half)) * c.dec_ctx
    decode_step *= decoding
    in_progress = np.maximum(np.where(busy, _prefill_iteration_s(c, chunk, gemm[1]), 0.0), decode_step)
    state_s = 0.5 * in_progress + backlog * backlog / np.maximum(view.waiting, 1.0) * c.half_attn_flop
    free = view.max_kv_tokens - used - (KV_RESERVE_RATIO * half) * running
    finishes_per_token = ((view.max_kv_tokens > 0) & decoding) / (used / np.maximum(running, 1.0)
                                                                  + KV_RESERVE_RATIO * half)
    queued_out = np.maximum(view.waiting, busy) * others_out + out - free

    # This request's terms, as matched and, when anything matched, as a full miss (k rows each): the
    # backlog and its uncached tokens (`total`), then, for its own prefill time, its uncached tokens alone.
    hit, stale_risk = _match_rows(request, view, kv_usage, cached)
    k = len(hit)
    tokens = np.empty((2 * k if terms else k, n))
    uncached = np.subtract(prompt, hit, out=tokens[k:]) if terms else prompt - hit
    total = np.add(backlog, uncached, out=tokens[:k])
    prefill = _chunked_prefill_s(c, tokens)
    finishes = np.maximum(total + queued_out, 0.0) * finishes_per_token
    kv_steps = half * np.minimum(finishes, 1.0) + np.maximum(finishes - 1.0, 0.0) * (others_out / (running + 1.0))
    own_attn = _own_attention_s(c, hit, uncached)
    seconds = np.empty((2 if terms else 1, k, n))  # TTFT, then the own prefill time
    ttft = np.add(state_s, prefill[:k], out=seconds[0])
    ttft += own_attn
    ttft += kv_steps * decode_step
    if terms:
        np.add(prefill[k:], own_attn, out=seconds[1])
    seconds *= 1000.0
    expected = _expected(seconds, stale_risk)
    return expected[0], (CostTerms(expected[1], in_progress * 1000.0) if terms else None)


def _others_output_tokens(view: ClusterView, out: float) -> np.ndarray | float:
    """The output length of the requests running and queued on each worker: its recent completions (clipped
    as SGLang clips max_new_tokens), or this request's `out` where none finished yet (a scalar when none has
    anywhere, as at a cold start)."""
    recent = view.recent_output_tokens
    if not recent.any():
        return out
    return np.where(recent > 0, np.minimum(recent, CLIP_MAX_NEW_TOKENS), out)


def own_prefill_ms(request: RequestInfo, view: ClusterView, model: str = DEFAULT_MODEL) -> np.ndarray:
    """This request's own prefill time (ms) on every worker, shape (n_workers,): its uncached tokens in
    chunked-prefill iterations with their attention, expected over the same stale-match risk, without
    anything queued ahead of it. SGLang runs a prefill before the next decode step and before the
    prefills queued after it, so this is also the delay the request adds to each request outstanding on
    that worker (their next token) and to each one that will queue behind it."""
    c = _coefficients(view, model)
    hit, stale_risk = _match_rows(request, view, np.minimum(view.kv_usage, 1.0))
    uncached = float(request.prompt_tokens) - hit
    seconds = _chunked_prefill_s(c, uncached)
    seconds += _own_attention_s(c, hit, uncached)
    seconds *= 1000.0
    return _expected(seconds[None], stale_risk)[0]


def _own_attention_s(c: _Coefficients, hit: np.ndarray, uncached: np.ndarray) -> np.ndarray:
    """Attention of the request's uncached tokens over its cached prefix and themselves."""
    return uncached * (hit + 0.5 * uncached) * c.attn_flop


def _match_rows(request: RequestInfo, view: ClusterView, kv_usage: np.ndarray, cached: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """The cached tokens per worker as matched (row 0) and, when anything matched, as a full miss (row 1),
    with the probability per worker that the match is already evicted (None when nothing matched)."""
    matched = cached_tokens(request, view) if cached is None else cached
    if not matched.any():
        return matched[None, :], None
    return matched * _HIT_AND_MISS, (STALE_MATCH_RATE * kv_usage) * (matched > 0)


def _chunked_prefill_s(c: _Coefficients, tokens: np.ndarray) -> np.ndarray:
    """`tokens` new tokens in chunked-prefill iterations (full chunks, then the rest), without attention."""
    full = np.ceil(tokens / c.chunked_prefill_size)
    full -= 1.0
    rest = tokens - full * c.chunked_prefill_size
    out = full * c.full_chunk
    out += _prefill_iteration_s(c, rest, _gemm_s(c, rest))
    return out


def _expected(rows: np.ndarray, stale_risk: np.ndarray | None) -> np.ndarray:
    """The expected value over the stale-match risk of per-worker values given as matched / missed rows
    (axis -2; any leading axes are separate quantities)."""
    if stale_risk is None:
        return rows[..., 0, :]
    matched = rows[..., 0, :]
    return matched + stale_risk * (rows[..., 1, :] - matched)
