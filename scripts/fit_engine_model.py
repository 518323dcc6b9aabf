"""Fit the engine step-time model to the measured kernel profiles; write sim/engine/calibration.json.

    .venv/bin/python scripts/fit_engine_model.py [--data-dir DIR] [--out PATH] [--check]

Per measured GPU (A100, H100, A40 from Vidur mlp.csv; RTX4090, RTXPRO6000 from LLMServingSim) it fits
the GEMM, element-wise, attention, lm_head and sampler terms of sim/engine/perf_model.py by least
squares on relative error, then derives the GPUs without measurements from an architecture sibling
(see DERIVED). It writes constants, per-term fit errors (MAPE) and profile-derived idle TTFT/TPOT
references; never the data itself. --check refits and fails if the committed JSON differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import least_squares

from lodestar.hardware import GPUS, GPUSpec, ModelSpec, gpu, model
from lodestar.settings import Settings
from sim.engine.config import EngineConfig
from sim.engine.perf_model import (
    CALIBRATION_FILE,
    GPUCalibration,
    PerfModel,
    dense_layer,
    elementwise_bytes,
    layer_params,
)
from sim.engine.profiles import (
    AttentionProfile,
    DenseProfile,
    GPUProfiles,
    ProfileReference,
    SequenceProfile,
    load_profiles,
)

# Assumed, not fitted: per-iteration CPU time the overlap scheduler does not hide (no profile has it).
HOST_OVERHEAD_S = 0.0005
# GPUs without measurements take every efficiency from the measured GPU of the closest architecture,
# except where COMPUTE_FROM_DATACENTER says otherwise (see docs/engine-model.md).
DERIVED = {
    "L40S": ("RTX4090", "Ada Lovelace AD102, as the RTX 4090"),
    "L4": ("RTX4090", "Ada Lovelace AD104, as the RTX 4090"),
    "A10G": ("A40", "Ampere GA102, as the A40"),
    "A30": ("A100", "Ampere GA100, as the A100"),
    "V100": ("A100", "Volta has no measured sibling; A100 efficiencies (rough)"),
}
# The RTX 4090 reaches ~96% of its BF16 peak, which GeForce cards quote at half rate (FP32 accumulate);
# the datacenter Ada parts quote full rate under a much tighter power limit, so their compute
# efficiencies are the mean of the measured non-GeForce GPUs instead.
COMPUTE_FROM_DATACENTER = {"L40S", "L4"}
DATACENTER_MEASURED = ("A100", "H100", "A40", "RTXPRO6000")
COMPUTE_KEYS = ("gemm_flops_eff", "attn_flops_eff")
TTFT_PROMPTS = (256, 1024, 2048, 4096, 8192, 16384)
TPOT_CONTEXTS = (1024, 4096, 16384)


def pnorm_arr(a: np.ndarray, b: np.ndarray | float, p: float) -> np.ndarray:
    hi = np.maximum(a, b)
    lo = np.minimum(a, b)
    return hi * (1 + (lo / hi) ** p) ** (1 / p)


def mape(pred: np.ndarray, meas: np.ndarray) -> float:
    return float(np.mean(np.abs(pred / meas - 1)) * 100)


def octave_weights(tokens: np.ndarray) -> np.ndarray:
    """Weights giving each octave of token counts the same say (the profiles sample large counts densely,
    but decode steps, the most frequent, have few tokens)."""
    log_t = np.log2(tokens)
    edges = np.concatenate([[log_t[0]], (log_t[1:] + log_t[:-1]) / 2, [log_t[-1]]])
    width = np.maximum(np.diff(edges), 1e-3)
    return np.sqrt(width / width.sum())


def fit_gemm(dense: list[DenseProfile], g: GPUSpec) -> tuple[dict[str, float], float]:
    flops, bw = g.tflops * 1e12, g.mem_bw_gbs * 1e9

    def predict(x: np.ndarray, d: DenseProfile) -> np.ndarray:
        P = layer_params(d.shape)
        return pnorm_arr(d.tokens * 2 * P / (flops * x[0]), P * d.shape.dtype_bytes / (bw * x[1]), x[2])

    def resid(x: np.ndarray) -> np.ndarray:
        return np.concatenate([(predict(x, d) / d.gemm_s - 1) * octave_weights(d.tokens) for d in dense])

    x = least_squares(resid, [0.6, 0.8, 3.0], bounds=([0.05, 0.05, 1.0], [2.0, 1.5, 30.0])).x
    err = mape(np.concatenate([predict(x, d) for d in dense]), np.concatenate([d.gemm_s for d in dense]))
    return {"gemm_flops_eff": x[0], "gemm_bw_eff": x[1], "gemm_p": x[2]}, err


def fit_elementwise(dense: list[DenseProfile], g: GPUSpec) -> tuple[dict[str, float], float]:
    bw = g.mem_bw_gbs * 1e9

    def predict(x: np.ndarray, d: DenseProfile) -> np.ndarray:
        return x[0] * 1e-6 + d.tokens * elementwise_bytes(d.shape) / (bw * x[1])

    def resid(x: np.ndarray) -> np.ndarray:
        return np.concatenate([(predict(x, d) / d.elem_s - 1) * octave_weights(d.tokens) for d in dense])

    x = least_squares(resid, [20.0, 0.5], bounds=([0.0, 0.01], [1000.0, 3.0])).x
    err = mape(np.concatenate([predict(x, d) for d in dense]), np.concatenate([d.elem_s for d in dense]))
    step_fixed = float(np.median(np.concatenate([d.step_s[d.tokens <= 64] for d in dense])))
    return {"layer_fixed_s": x[0] * 1e-6, "elem_bw_eff": x[1], "step_fixed_s": step_fixed}, err


def attention_predict(x: np.ndarray, a: AttentionProfile, g: GPUSpec, m: ModelSpec,
                      mixed_factor: float = 1.0) -> np.ndarray:
    """Per-layer attention time of each profile row under parameters x (see fit_attention); decode
    attention batched with a prefill chunk costs `mixed_factor` times as much."""
    flops, bw = g.tflops * 1e12, g.mem_bw_gbs * 1e9
    q_dim = m.heads * m.head_dim
    kv_bytes = 2 * m.kv_heads * m.head_dim * m.dtype_bytes
    quad = a.chunk * (a.prefix + (a.chunk + 1) / 2) * 4 * q_dim / (flops * x[1])
    starved = np.where(a.chunk > 0, (a.prefix + a.chunk) * x[2] * kv_bytes / bw, 0.0)
    decode = a.n_decode * x[3] * 1e-6 + a.n_decode * a.kv_decode * kv_bytes / (bw * x[4])
    decode = np.where(a.chunk > 0, decode * mixed_factor, decode)
    return x[0] * 1e-6 + np.maximum(quad, starved) + decode


def fit_attention(a: AttentionProfile, g: GPUSpec, m: ModelSpec) -> tuple[dict[str, float], dict[str, float]]:
    """Fit on the prefill-only and decode-only rows, each group weighted equally; then the factor by
    which decode attention is dearer inside a mixed batch (SGLang runs the decoding requests through
    the prefill kernel as 1-token extends) on the mixed rows."""
    pre = a.n_decode == 0
    dec = a.chunk == 0
    mix = ~pre & ~dec
    weight = np.where(pre, 1 / np.sqrt(pre.sum()), 1 / np.sqrt(max(dec.sum(), 1)))
    fit_rows = pre | dec

    def resid(x: np.ndarray) -> np.ndarray:
        return ((attention_predict(x, a, g, m) / a.time_s - 1) * weight)[fit_rows]

    x = least_squares(resid, [8.0, 0.5, 8.0, 0.1, 0.7],
                      bounds=([0.0, 0.01, 0.0, 0.0, 0.05], [100.0, 2.0, 100.0, 10.0, 2.0])).x
    additive = attention_predict(x, a, g, m)
    f = least_squares(lambda y: (attention_predict(x, a, g, m, y[0]) / a.time_s - 1)[mix], [1.0],
                      bounds=([0.5], [10.0])).x[0]
    pred = attention_predict(x, a, g, m, f)
    errors = {"attention_prefill": mape(pred[pre], a.time_s[pre]), "attention_decode": mape(pred[dec], a.time_s[dec]),
              "attention_mixed": mape(pred[mix], a.time_s[mix]),
              "attention_mixed_additive": mape(additive[mix], a.time_s[mix])}
    params = {"attn_fixed_s": x[0] * 1e-6, "attn_flops_eff": x[1], "attn_key_factor": x[2], "dec_seq_s": x[3] * 1e-6,
              "dec_kv_bw_eff": x[4], "mixed_decode_factor": f}
    return params, errors


def fit_sequence(s: SequenceProfile, g: GPUSpec, m: ModelSpec, gemm: dict[str, float]
                 ) -> tuple[dict[str, float], dict[str, float]]:
    flops, bw = g.tflops * 1e12, g.mem_bw_gbs * 1e9
    lm_flop = 2 * m.vocab * m.hidden / (flops * gemm["gemm_flops_eff"])
    lm_bytes = m.vocab * m.hidden * m.dtype_bytes

    def lm_pred(eff: float) -> np.ndarray:
        return pnorm_arr(s.seqs * lm_flop, lm_bytes / (bw * eff), gemm["gemm_p"])

    e_lm = least_squares(lambda x: lm_pred(x[0]) / s.lm_head_s - 1, [0.8], bounds=([0.05], [2.0])).x[0]
    unit = m.vocab * 4 / bw

    def samp_pred(x: np.ndarray) -> np.ndarray:
        return x[0] * 1e-6 + s.seqs * x[1] * unit

    xs = least_squares(lambda x: samp_pred(x) / s.sampler_s - 1, [20.0, 2.0], bounds=([0.0, 0.0], [1000.0, 100.0])).x
    params = {"lm_bw_eff": e_lm, "sampler_fixed_s": xs[0] * 1e-6, "sampler_seq_factor": xs[1]}
    errors = {"lm_head": mape(lm_pred(e_lm), s.lm_head_s), "sampler": mape(samp_pred(xs), s.sampler_s)}
    return params, errors


def fit_gpu(prof: GPUProfiles, g: GPUSpec, llama: ModelSpec) -> tuple[dict[str, float], dict[str, float]]:
    """Everything the GPU's own profiles determine, and the fit errors of those terms."""
    gemm, gemm_err = fit_gemm(prof.dense, g)
    elem, elem_err = fit_elementwise(prof.dense, g)
    params: dict[str, float] = {**gemm, **elem}
    pm_cal = GPUCalibration.from_dict({k: params.get(k, 1.0) for k in GPUCalibration.__slots__})
    pred = np.concatenate([[dense_layer(pm_cal, g, d.shape, int(t)) for t in d.tokens] for d in prof.dense])
    meas = np.concatenate([d.gemm_s + d.elem_s for d in prof.dense])
    errors = {"dense_layer": mape(pred, meas), "gemm": gemm_err, "elementwise": elem_err}
    if prof.attention is not None and prof.sequence is not None:
        att, att_err = fit_attention(prof.attention, g, llama)
        seq, seq_err = fit_sequence(prof.sequence, g, llama, gemm)
        params.update(att)
        params.update(seq)
        errors.update(att_err)
        errors.update(seq_err)
    return params, errors


def complete_vidur(params: dict[str, float], llmss: list[dict[str, float]]) -> None:
    """Attention/lm_head/sampler terms for a GPU whose profile lacks them: the measured GPUs'
    efficiencies relative to their own GEMM efficiencies, applied to this GPU's GEMM efficiencies."""
    def mean(key: str) -> float:
        return float(np.mean([p[key] for p in llmss]))

    params["attn_flops_eff"] = params["gemm_flops_eff"] * float(
        np.mean([p["attn_flops_eff"] / p["gemm_flops_eff"] for p in llmss]))
    params["lm_bw_eff"] = params["gemm_bw_eff"] * float(np.mean([p["lm_bw_eff"] / p["gemm_bw_eff"] for p in llmss]))
    params["dec_kv_bw_eff"] = params["gemm_bw_eff"] * float(
        np.mean([p["dec_kv_bw_eff"] / p["gemm_bw_eff"] for p in llmss]))
    for key in ("attn_fixed_s", "attn_key_factor", "dec_seq_s", "sampler_fixed_s", "sampler_seq_factor",
                "mixed_decode_factor"):
        params[key] = mean(key)


def ttft_model(pm: PerfModel, prompt: int, chunk: int) -> float:
    t, done = 0.0, 0
    while done < prompt:
        c = min(chunk, prompt - done)
        t += pm.step_time([(c, done)], 0, 0)
        done += c
    return t


def references(name: str, prof: GPUProfiles, calibration: dict[str, Any], llama: ModelSpec
               ) -> tuple[dict[str, Any], dict[str, float]]:
    """Profile-derived idle TTFT/TPOT on this GPU, the model's, and their relative errors."""
    g = gpu(name)
    pm = PerfModel(name, llama.name, calibration)
    ref = ProfileReference(prof, llama, pm)
    chunk = EngineConfig().resolved(g, llama).chunked_prefill_size or 1 << 30
    ttft: dict[str, dict[str, float]] = {}
    tpot: dict[str, dict[str, float]] = {}
    for n in TTFT_PROMPTS:
        r = ref.ttft(n, chunk)
        if r is not None:
            ttft[str(n)] = {"reference_s": r, "model_s": ttft_model(pm, n, chunk)}
    for ctx in TPOT_CONTEXTS:
        tpot[str(ctx)] = {"reference_s": ref.decode_step(ctx), "model_s": pm.decode_time(1, ctx)}
    rel_t = [abs(v["model_s"] / v["reference_s"] - 1) * 100 for v in ttft.values()]
    rel_d = [abs(v["model_s"] / v["reference_s"] - 1) * 100 for v in tpot.values()]
    errors = {"ttft_mape": float(np.mean(rel_t)), "ttft_max": float(np.max(rel_t)),
              "tpot_mape": float(np.mean(rel_d)), "tpot_max": float(np.max(rel_d))}
    return {"chunked_prefill_size": chunk, "ttft": ttft, "tpot": tpot}, errors


def fit_all(data_dir: Path) -> dict[str, Any]:
    llama = model("llama-3.1-8b")
    profiles = load_profiles(data_dir, llama)
    if not profiles:
        raise SystemExit(f"no profiles under {data_dir / 'profiles'}")
    fitted: dict[str, dict[str, float]] = {}
    errors: dict[str, dict[str, float]] = {}
    for name, prof in profiles.items():
        fitted[name], errors[name] = fit_gpu(prof, gpu(name), llama)
    llmss = [p for p in fitted.values() if "attn_flops_eff" in p]
    gpus: dict[str, dict[str, Any]] = {}
    for name, params in fitted.items():
        source = " + ".join(profiles[name].files)
        if "attn_flops_eff" not in params:
            complete_vidur(params, llmss)
            source += " (attention, lm_head, sampler: transferred from the LLMServingSim GPUs)"
        gpus[name] = {**params, "host_overhead_s": HOST_OVERHEAD_S, "source": source}
    for name, (sibling, why) in DERIVED.items():
        derived = {k: v for k, v in gpus[sibling].items() if k != "source"}
        if name in COMPUTE_FROM_DATACENTER:
            for key in COMPUTE_KEYS:
                derived[key] = float(np.mean([gpus[g][key] for g in DATACENTER_MEASURED]))
            why += f"; compute efficiencies: mean of {', '.join(DATACENTER_MEASURED)}"
        gpus[name] = {**derived,
                      "source": f"derived: no measurement; {why}; scaled by its own peak TFLOPS and bandwidth"}
    missing = set(GPUS) - set(gpus)
    if missing:
        raise SystemExit(f"no calibration for {sorted(missing)}")
    calibration: dict[str, Any] = {"generated_by": "scripts/fit_engine_model.py", "model": llama.name,
                                   "gpus": {k: gpus[k] for k in sorted(gpus)}}
    refs: dict[str, Any] = {}
    for name, prof in profiles.items():
        refs[name], ref_err = references(name, prof, calibration, llama)
        errors[name].update(ref_err)
    calibration["fit_error_pct"] = {k: {t: round(v, 2) for t, v in errors[k].items()} for k in sorted(errors)}
    calibration["reference"] = refs
    for name in calibration["gpus"]:
        GPUCalibration.from_dict(calibration["gpus"][name])  # every constant present
    return calibration


def _rounded(obj: Any) -> Any:
    if isinstance(obj, float):
        return float(f"{obj:.6g}")
    if isinstance(obj, dict):
        return {k: _rounded(v) for k, v in obj.items()}
    return obj


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, default=Settings().data_dir)
    ap.add_argument("--out", type=Path, default=CALIBRATION_FILE)
    ap.add_argument("--check", action="store_true", help="fail if the committed calibration is stale")
    args = ap.parse_args(argv)
    calibration = _rounded(fit_all(args.data_dir))
    text = json.dumps(calibration, indent=1, sort_keys=False) + "\n"
    if args.check:
        same = args.out.exists() and json.loads(args.out.read_text()) == json.loads(text)
        print("calibration up to date" if same else f"{args.out} differs from a fresh fit")
        return 0 if same else 1
    args.out.write_text(text)
    print(f"wrote {args.out}")
    keys = list(dict.fromkeys(k for errs in calibration["fit_error_pct"].values() for k in errs))
    print("fit error, % (MAPE unless *_max):")
    print(f"{'term':<18} " + " ".join(f"{name:>10}" for name in calibration["fit_error_pct"]))
    for key in keys:
        print(f"{key:<18} " + " ".join(f"{errs.get(key, float('nan')):>10.2f}"
                                       for errs in calibration["fit_error_pct"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
