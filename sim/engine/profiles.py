"""Read the measured kernel profiles in `<data_dir>/profiles` and derive step times from them directly.

Used by the calibration fit (scripts/fit_engine_model.py), the calibration tests and the benchmark;
the engine itself never needs the data. Two sources (see the data README):

* Vidur `*/mlp.csv` (A100, H100, A40): per-layer times (ms) of the non-attention ops vs tokens.
* LLMServingSim (RTX4090, RTXPRO6000; Llama-3.1-8B): `dense.csv` per-layer op times (us) vs tokens,
  `attention.csv` per-layer attention time (us) of one prefill chunk plus n decode sequences,
  `per_sequence.csv` lm_head and sampler time (us) vs sequences.

`ProfileReference` turns one GPU's profiles into the time of an idle prefill or decode step by
interpolating the measurements, independent of the fitted model's functional form.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.interpolate import LinearNDInterpolator

from lodestar.hardware import ModelSpec
from sim.engine.perf_model import PerfModel

VIDUR_FILES = {
    "A100": ("a100_Meta-Llama-3-8B_mlp.csv", "a100_Llama-2-7b-hf_mlp.csv"),
    "H100": ("h100_Llama-2-7b-hf_mlp.csv",),
    "A40": ("a40_Llama-2-7b-hf_mlp.csv",),
}
LLMSS_PREFIX = {"RTX4090": "rtx4090_llama31_8b_tp1", "RTXPRO6000": "rtxpro6000_llama31_8b_tp1"}
MEASURED_GPUS = tuple(VIDUR_FILES) + tuple(LLMSS_PREFIX)

VIDUR_GEMM = ("attn_pre_proj", "attn_post_proj", "mlp_up_proj", "mlp_down_proj")
VIDUR_ELEM = ("input_layernorm", "post_attention_layernorm", "attn_rope", "mlp_act", "add")
LLMSS_GEMM = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# (op, times per layer): SGLang's Llama layer runs two RMSNorms (residual add fused into them).
LLMSS_ELEM = (("layernorm", 2), ("rotary_emb", 1), ("act_fn", 1))
LLMSS_STEP = ("embedding", "final_layernorm")


@dataclass
class DenseProfile:
    """Per-layer GEMM and element-wise times (seconds) vs tokens, for one model shape."""

    shape: ModelSpec
    tokens: np.ndarray
    gemm_s: np.ndarray
    elem_s: np.ndarray
    step_s: np.ndarray  # per step (embedding, final norm), not per layer
    source: str


@dataclass
class AttentionProfile:
    """Per-layer attention times (seconds) of (prefill_chunk, kv_prefill, n_decode, kv_decode) rows."""

    chunk: np.ndarray
    prefix: np.ndarray
    n_decode: np.ndarray
    kv_decode: np.ndarray
    time_s: np.ndarray


@dataclass
class SequenceProfile:
    """lm_head and sampler times (seconds) vs sequences in the batch."""

    seqs: np.ndarray
    lm_head_s: np.ndarray
    sampler_s: np.ndarray


@dataclass
class GPUProfiles:
    """Everything measured for one GPU type."""

    gpu: str
    dense: list[DenseProfile]
    attention: AttentionProfile | None = None
    sequence: SequenceProfile | None = None
    files: list[str] = field(default_factory=list)


def _vidur_shape(row: dict[str, str], name: str) -> ModelSpec:
    heads = int(float(row["n_head"]))
    hidden = int(float(row["n_embd"]))
    return ModelSpec(name, layers=32, hidden=hidden, intermediate=int(float(row["n_expanded_embd"])),
                     heads=heads, kv_heads=int(float(row["n_kv_head"])), head_dim=hidden // heads,
                     vocab=int(float(row["vocab_size"])), params_b=0.0)


def _read_vidur(path: Path) -> DenseProfile:
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if int(float(r["num_tensor_parallel_workers"])) == 1]
    by_tokens: dict[int, dict[str, str]] = {}
    for r in rows:  # a few token counts appear twice; keep the first
        by_tokens.setdefault(int(float(r["num_tokens"])), r)
    tokens = np.array(sorted(by_tokens), dtype=np.float64)

    def total(ops: tuple[str, ...]) -> np.ndarray:
        return np.array([sum(float(by_tokens[int(t)][f"time_stats.{op}.median"]) for op in ops)
                         for t in tokens]) * 1e-3

    return DenseProfile(shape=_vidur_shape(rows[0], path.stem), tokens=tokens, gemm_s=total(VIDUR_GEMM),
                        elem_s=total(VIDUR_ELEM), step_s=total(("emb",)), source=path.name)


def _read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _read_llmss(directory: Path, prefix: str, shape: ModelSpec) -> GPUProfiles:
    dense_rows = _read_rows(directory / f"{prefix}_dense.csv")
    ops: dict[str, dict[int, float]] = {}
    for r in dense_rows:
        ops.setdefault(r["layer"], {})[int(r["tokens"])] = float(r["time_us"]) * 1e-6
    tokens = np.array(sorted(ops["qkv_proj"]), dtype=np.float64)

    def col(op: str) -> np.ndarray:
        return np.array([ops[op][int(t)] for t in tokens])

    dense = DenseProfile(
        shape=shape, tokens=tokens, gemm_s=sum(col(op) for op in LLMSS_GEMM),
        elem_s=sum(k * col(op) for op, k in LLMSS_ELEM), step_s=sum(col(op) for op in LLMSS_STEP),
        source=f"{prefix}_dense.csv")
    att = np.array([[float(r[k]) for k in ("prefill_chunk", "kv_prefill", "n_decode", "kv_decode", "time_us")]
                    for r in _read_rows(directory / f"{prefix}_attention.csv")])
    attention = AttentionProfile(chunk=att[:, 0], prefix=att[:, 1], n_decode=att[:, 2], kv_decode=att[:, 3],
                                 time_s=att[:, 4] * 1e-6)
    per_seq: dict[str, dict[int, float]] = {}
    for r in _read_rows(directory / f"{prefix}_per_sequence.csv"):
        per_seq.setdefault(r["layer"], {})[int(r["sequences"])] = float(r["time_us"]) * 1e-6
    seqs = np.array(sorted(per_seq["lm_head"]), dtype=np.float64)
    sequence = SequenceProfile(seqs=seqs, lm_head_s=np.array([per_seq["lm_head"][int(s)] for s in seqs]),
                               sampler_s=np.array([per_seq["sampler"][int(s)] for s in seqs]))
    files = [f"{prefix}_{kind}.csv" for kind in ("dense", "attention", "per_sequence")]
    return GPUProfiles(gpu="", dense=[dense], attention=attention, sequence=sequence, files=files)


def load_profiles(data_dir: Path, llama31: ModelSpec) -> dict[str, GPUProfiles]:
    """All measured GPUs found under `data_dir/profiles` (empty if the data is absent)."""
    root = data_dir / "profiles"
    out: dict[str, GPUProfiles] = {}
    for name, files in VIDUR_FILES.items():
        paths = [root / "vidur" / f for f in files if (root / "vidur" / f).exists()]
        if paths:
            out[name] = GPUProfiles(gpu=name, dense=[_read_vidur(p) for p in paths],
                                    files=[p.name for p in paths])
    for name, prefix in LLMSS_PREFIX.items():
        if (root / "llmservingsim" / f"{prefix}_dense.csv").exists():
            prof = _read_llmss(root / "llmservingsim", prefix, llama31)
            prof.gpu = name
            out[name] = prof
    return out


class ProfileReference:
    """Idle prefill/decode step times of Llama-3.1-8B built from one GPU's measurements alone.

    Non-attention layers: interpolated in tokens (linear beyond the largest measured count, where the
    layers are compute-bound). Where the GPU was profiled only on Llama-2-7B (H100, A40), the measured
    time is carried to the Llama-3.1-8B shape by the ratio of the fitted model's layer times for the
    two shapes (about +8% in FLOPs). Attention, lm_head and sampler: interpolated from the LLMServingSim
    tables when the GPU has them; otherwise (Vidur GPUs) taken from `model`, the fitted model's own
    terms, because Vidur's mlp.csv does not measure them. No profile measures host overhead, so the
    model's assumed per-iteration host overhead is added to every step.
    """

    CHUNK_GRID_MAX = 2048  # largest measured prefill chunk in attention.csv

    def __init__(self, prof: GPUProfiles, shape: ModelSpec, model: PerfModel) -> None:
        # prefer the profile measured on the Llama-3 shape
        dense = next((d for d in prof.dense if d.shape.intermediate == shape.intermediate), prof.dense[0])
        self.dense = dense
        self.shape = shape
        self.layers = shape.layers
        self.prof = prof
        self.model = model
        self.host_s = model.coef.host_s
        self._prefill_interp: LinearNDInterpolator | None = None
        if prof.attention is not None:
            a = prof.attention
            pre = (a.n_decode == 0) & (a.chunk > 0)
            self._prefill_interp = LinearNDInterpolator(np.c_[a.chunk[pre], a.prefix[pre]], a.time_s[pre])
            dec = (a.chunk == 0) & (a.n_decode == 1)
            order = np.argsort(a.kv_decode[dec])
            self._decode_kv = a.kv_decode[dec][order]
            self._decode_t = a.time_s[dec][order]

    def _dense_layer(self, tokens: int) -> float:
        d = self.dense
        t = d.gemm_s + d.elem_s
        if tokens <= d.tokens[-1]:
            measured = float(np.interp(tokens, d.tokens, t))
        else:
            measured = float(t[-1] * tokens / d.tokens[-1])
        if d.shape.intermediate == self.shape.intermediate:
            return measured
        return measured * self.model.dense_layer_time(self.shape, tokens) / self.model.dense_layer_time(d.shape, tokens)

    def _step_extra(self, tokens: float) -> float:
        d = self.dense
        return float(np.interp(min(tokens, d.tokens[-1]), d.tokens, d.step_s))

    def _prefill_attention_layer(self, chunk: int, prefix: int) -> float:
        assert self._prefill_interp is not None
        total = 0.0
        while chunk > 0:  # a long chunk's causal attention = that of its 2048-token pieces
            piece = min(chunk, self.CHUNK_GRID_MAX)
            total += float(self._prefill_interp(piece, prefix))
            chunk -= piece
            prefix += piece
        return total

    def _logits(self, seqs: int) -> float:
        s = self.prof.sequence
        assert s is not None
        return float(np.interp(seqs, s.seqs, s.lm_head_s) + np.interp(seqs, s.seqs, s.sampler_s))

    def prefill_step(self, chunk: int, prefix: int) -> float | None:
        """Seconds of an idle step prefilling one chunk; None if outside the measured attention grid."""
        dense = self.host_s + self.layers * self._dense_layer(chunk) + self._step_extra(chunk)
        if self._prefill_interp is None:
            return dense + self.model.attention_and_logits_time([(chunk, prefix)], 0, 0)
        attn = self._prefill_attention_layer(chunk, prefix)
        if not np.isfinite(attn):
            return None
        return dense + self.layers * attn + self._logits(1)

    def ttft(self, prompt: int, chunk: int) -> float | None:
        """Idle time to first token of a `prompt`-token request prefilled in `chunk`-token chunks."""
        t, done = 0.0, 0
        while done < prompt:
            c = min(chunk, prompt - done)
            step = self.prefill_step(c, done)
            if step is None:
                return None
            t += step
            done += c
        return t

    def decode_step(self, context: int) -> float:
        """Seconds of an idle decode step of one sequence with `context` tokens."""
        dense = self.host_s + self.layers * self._dense_layer(1) + self._step_extra(1)
        if self._prefill_interp is None:
            return dense + self.model.attention_and_logits_time([], 1, context)
        attn = float(np.interp(context, self._decode_kv, self._decode_t))
        return dense + self.layers * attn + self._logits(1)
