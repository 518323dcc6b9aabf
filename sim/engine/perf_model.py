"""Step-time model of one SGLang engine iteration, calibrated on measured kernel profiles.

One iteration runs some prefill chunks (each: `c` new tokens on top of `p` already-computed tokens)
and some decode sequences (each: one new token reading its whole context). Its time is

    host                                           per-iteration scheduler/launch overhead
  + fixed                                          per-layer small-kernel latency, embedding, sampler
  + T * per_token                                  element-wise ops (norms, rope, act, residual adds)
  + pnorm(T * gemm_flop, gemm_weight; p)           linear layers: compute-bound, floored by weight reads
  + pnorm(S * lm_flop, lm_weight; p) + S * samp    lm_head and sampler on the S sequences that emit logits
  + sum_chunks max(c (p + (c+1)/2) * attn_flop,    prefill attention: quadratic FLOPs, or one
                   (p + c) * attn_key)             under-occupied pass over the keys for short chunks
  + n * dec_seq + ctx * dec_ctx                    decode attention: reading every sequence's KV
                                                   (x mixed_decode_factor when batched with a chunk)

where T is the number of tokens in the batch and `pnorm(a, b; p) = (a^p + b^p)^(1/p)`, a smooth max
whose sharpness p is fitted (p -> inf is the plain max). Constants per GPU come from
`calibration.json`, written by `scripts/fit_engine_model.py`; see docs/engine-model.md.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from lodestar.hardware import GPUSpec, ModelSpec, gpu, model

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
UNBOUNDED_ITERATIONS = 1 << 62


@dataclass(frozen=True, slots=True)
class GPUCalibration:
    """Hardware efficiencies and latencies of one GPU type (dimensionless or seconds)."""

    gemm_flops_eff: float  # achieved / peak dense TFLOPS of large linear layers
    gemm_bw_eff: float  # achieved / peak bandwidth when a linear layer only streams its weights
    gemm_p: float  # sharpness of the smooth max between the two GEMM bounds
    elem_bw_eff: float  # achieved / peak bandwidth of element-wise ops
    layer_fixed_s: float  # per layer: latency of the small kernels at one token
    step_fixed_s: float  # per step: embedding + final norm at one token
    attn_flops_eff: float  # achieved / peak TFLOPS of prefill attention
    attn_key_factor: float  # starved prefill pass: seconds per key = factor * kv bytes per layer / bw
    attn_fixed_s: float  # per layer: attention kernel launch latency
    dec_kv_bw_eff: float  # achieved / peak bandwidth reading KV in decode attention
    dec_seq_s: float  # per layer and decode sequence: attention bookkeeping
    mixed_decode_factor: float  # decode attention batched with a prefill chunk costs this much more
    lm_bw_eff: float  # achieved / peak bandwidth of lm_head when it streams its weights
    sampler_fixed_s: float  # per step
    sampler_seq_factor: float  # per sequence: factor * vocab * 4 bytes / bw
    host_overhead_s: float  # per iteration: CPU scheduling not hidden behind the GPU (assumed)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPUCalibration:
        return cls(**{name: float(d[name]) for name in cls.__slots__})


@dataclass(frozen=True, slots=True)
class StepCoefficients:
    """A GPU calibration applied to one model: everything in seconds, ready for cheap arithmetic."""

    fixed_s: float  # everything constant per iteration (includes the three below)
    host_s: float
    attn_fixed_s: float
    sampler_fixed_s: float
    per_token_s: float
    gemm_flop_s: float  # per token
    gemm_weight_s: float
    gemm_p: float
    lm_flop_s: float  # per sequence
    lm_weight_s: float
    sampler_seq_s: float
    attn_flop_s: float  # per unit of c * (p + (c + 1) / 2)
    attn_key_s: float  # per key of a starved prefill chunk
    dec_seq_s: float
    dec_ctx_s: float  # per context token read by decode
    mixed_decode_factor: float

    @classmethod
    def build(cls, cal: GPUCalibration, g: GPUSpec, m: ModelSpec) -> StepCoefficients:
        flops = g.tflops * 1e12
        bw = g.mem_bw_gbs * 1e9
        L = m.layers
        b = m.dtype_bytes
        q_dim = m.heads * m.head_dim
        params = layer_params(m)
        kv_layer_bytes = 2 * m.kv_heads * m.head_dim * b
        return cls(
            fixed_s=cal.host_overhead_s + cal.step_fixed_s + cal.sampler_fixed_s
            + L * (cal.layer_fixed_s + cal.attn_fixed_s),
            host_s=cal.host_overhead_s,
            attn_fixed_s=L * cal.attn_fixed_s,
            sampler_fixed_s=cal.sampler_fixed_s,
            per_token_s=L * elementwise_bytes(m) / (bw * cal.elem_bw_eff),
            gemm_flop_s=L * 2 * params / (flops * cal.gemm_flops_eff),
            gemm_weight_s=L * params * b / (bw * cal.gemm_bw_eff),
            gemm_p=cal.gemm_p,
            lm_flop_s=2 * m.vocab * m.hidden / (flops * cal.gemm_flops_eff),
            lm_weight_s=m.vocab * m.hidden * b / (bw * cal.lm_bw_eff),
            sampler_seq_s=cal.sampler_seq_factor * m.vocab * 4 / bw,
            attn_flop_s=L * 4 * q_dim / (flops * cal.attn_flops_eff),
            attn_key_s=L * cal.attn_key_factor * kv_layer_bytes / bw,
            dec_seq_s=L * cal.dec_seq_s,
            dec_ctx_s=L * kv_layer_bytes / (bw * cal.dec_kv_bw_eff),
            mixed_decode_factor=cal.mixed_decode_factor,
        )


def layer_params(m: ModelSpec) -> int:
    """Weights of one decoder layer's linear projections (q, k, v, o, gate, up, down)."""
    q_dim = m.heads * m.head_dim
    kv_dim = m.kv_heads * m.head_dim
    return m.hidden * (q_dim + 2 * kv_dim) + q_dim * m.hidden + 3 * m.hidden * m.intermediate


def elementwise_bytes(m: ModelSpec) -> float:
    """Bytes an element-wise op chain moves per token per layer: two RMSNorms and two residual adds
    (read + write the hidden state), rotary on q and k, and the gated activation (reads 2I, writes I)."""
    q_dim = m.heads * m.head_dim
    kv_dim = m.kv_heads * m.head_dim
    return m.dtype_bytes * (8 * m.hidden + 2 * (q_dim + kv_dim) + 3 * m.intermediate)


def dense_layer(cal: GPUCalibration, g: GPUSpec, shape: ModelSpec, tokens: int) -> float:
    """One decoder layer's non-attention time (linear layers + element-wise ops) in seconds."""
    bw = g.mem_bw_gbs * 1e9
    params = layer_params(shape)
    gemm = pnorm(tokens * 2 * params / (g.tflops * 1e12 * cal.gemm_flops_eff),
                 params * shape.dtype_bytes / (bw * cal.gemm_bw_eff), cal.gemm_p)
    return cal.layer_fixed_s + gemm + tokens * elementwise_bytes(shape) / (bw * cal.elem_bw_eff)


def pnorm(a: float, b: float, p: float) -> float:
    """Smooth maximum (a^p + b^p)^(1/p) of two non-negative times."""
    if a <= 0.0:
        return b
    if b <= 0.0:
        return a
    hi = a if a > b else b
    lo = b if a > b else a
    return hi * (1.0 + (lo / hi) ** p) ** (1.0 / p)


class PerfModel:
    """Step time of one engine iteration on one GPU type serving one model."""

    __slots__ = ("gpu_type", "model_name", "spec", "cal", "coef", "_decode_cache")

    def __init__(self, gpu_type: str, model_name: str = "llama-3.1-8b",
                 calibration: dict[str, Any] | None = None) -> None:
        spec = gpu(gpu_type)
        m = model(model_name)
        cal_all = calibration if calibration is not None else load_calibration()
        try:
            cal = GPUCalibration.from_dict(cal_all["gpus"][spec.name])
        except KeyError:
            raise KeyError(f"no calibration for GPU {spec.name!r} in {CALIBRATION_FILE.name}") from None
        self.gpu_type = spec.name
        self.model_name = m.name
        self.spec = spec
        self.cal = cal
        self.coef = StepCoefficients.build(cal, spec, m)
        self._decode_cache: dict[int, float] = {}

    def step_time(self, chunks: list[tuple[int, int]], n_decode: int, decode_ctx: int,
                  n_logits: int | None = None) -> float:
        """Seconds for one iteration running prefill `chunks` [(new_tokens, prefix_len), ...] and
        `n_decode` decode sequences whose contexts sum to `decode_ctx` tokens. `n_logits` is the
        number of sequences that emit logits (default: every chunk and every decode sequence)."""
        c = self.coef
        tokens = n_decode
        attn = 0.0
        for new, prefix in chunks:
            tokens += new
            quad = new * (prefix + (new + 1) * 0.5) * c.attn_flop_s
            starved = (prefix + new) * c.attn_key_s
            attn += quad if quad > starved else starved
        seqs = len(chunks) + n_decode if n_logits is None else n_logits
        decode_attn = n_decode * c.dec_seq_s + decode_ctx * c.dec_ctx_s
        if chunks and n_decode:
            decode_attn *= c.mixed_decode_factor
        return (
            c.fixed_s
            + tokens * c.per_token_s
            + pnorm(tokens * c.gemm_flop_s, c.gemm_weight_s, c.gemm_p)
            + pnorm(seqs * c.lm_flop_s, c.lm_weight_s, c.gemm_p)
            + seqs * c.sampler_seq_s
            + attn
            + decode_attn
        )

    def dense_layer_time(self, shape: ModelSpec, tokens: int) -> float:
        """One decoder layer's non-attention time (linear layers + element-wise) for any model shape."""
        return dense_layer(self.cal, self.spec, shape, tokens)

    def attention_and_logits_time(self, chunks: list[tuple[int, int]], n_decode: int, decode_ctx: int) -> float:
        """The terms Vidur's mlp.csv does not measure: attention, lm_head and sampler (with their
        fixed latencies); used to complete a profile-derived step time on the Vidur GPUs."""
        c = self.coef
        seqs = len(chunks) + n_decode
        attn = 0.0
        for new, prefix in chunks:
            quad = new * (prefix + (new + 1) * 0.5) * c.attn_flop_s
            starved = (prefix + new) * c.attn_key_s
            attn += quad if quad > starved else starved
        return (c.attn_fixed_s + c.sampler_fixed_s + attn + n_decode * c.dec_seq_s + decode_ctx * c.dec_ctx_s
                + pnorm(seqs * c.lm_flop_s, c.lm_weight_s, c.gemm_p) + seqs * c.sampler_seq_s)

    def decode_base(self, n: int) -> float:
        """Time of a pure decode iteration of `n` sequences, excluding the per-context-token term."""
        t = self._decode_cache.get(n)
        if t is None:
            t = self.step_time([], n, 0)
            self._decode_cache[n] = t
        return t

    def decode_time(self, n: int, decode_ctx: int) -> float:
        """Time of one pure decode iteration."""
        return self.decode_base(n) + decode_ctx * self.coef.dec_ctx_s

    def decode_run_time(self, n: int, decode_ctx: int, k: int) -> float:
        """Total time of `k` consecutive decode iterations of the same `n` sequences, their contexts
        summing to `decode_ctx` in the first and growing by `n` each iteration (closed form)."""
        return k * self.decode_base(n) + self.coef.dec_ctx_s * (k * decode_ctx + n * k * (k - 1) / 2)

    def decode_iterations_within(self, n: int, decode_ctx: int, budget_s: float) -> int:
        """Largest k >= 0 with decode_run_time(n, decode_ctx, k) <= budget_s (2**62 if unbounded)."""
        if budget_s <= 0.0:
            return 0
        if budget_s == math.inf:
            return UNBOUNDED_ITERATIONS
        a = self.decode_base(n)
        d = self.coef.dec_ctx_s
        first = a + d * decode_ctx  # time of the first iteration
        inc = d * n  # each iteration is this much longer than the previous one
        if inc <= 0.0:
            return int(budget_s // first)
        # k*first + inc*k(k-1)/2 <= budget  ->  inc/2 k^2 + (first - inc/2) k - budget <= 0
        half = inc / 2
        bq = first - half
        k = int((-bq + (bq * bq + 4 * half * budget_s) ** 0.5) / (2 * half))
        while k > 0 and self.decode_run_time(n, decode_ctx, k) > budget_s:
            k -= 1
        while self.decode_run_time(n, decode_ctx, k + 1) <= budget_s:
            k += 1
        return k


@cache
def _load_calibration_file(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_calibration(path: Path | None = None) -> dict[str, Any]:
    """The committed calibration (fitted constants and fit errors); cached after the first read."""
    return _load_calibration_file(str(path or CALIBRATION_FILE))
