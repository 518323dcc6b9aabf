"""Public specifications of the GPUs and models Lodestar knows (sources in docs/engine-model.md).

Core data: the dispatcher's speed-aware policies and the shared features read GPU speed from here,
and the engine model in `sim/` builds its calibrated step-time model on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GPUSpec:
    """Peak dense bf16/fp16 tensor TFLOPS, HBM/GDDR bandwidth (GB/s) and memory (GB)."""

    name: str
    tflops: float
    mem_bw_gbs: float
    mem_gb: float


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a decoder-only transformer, as far as step time and KV size depend on it."""

    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    params_b: float
    dtype_bytes: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V, every layer, in the model's dtype."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def weight_bytes(self) -> float:
        return self.params_b * 1e9 * self.dtype_bytes


GPUS: dict[str, GPUSpec] = {
    g.name: g
    for g in (
        GPUSpec("H100", tflops=989.0, mem_bw_gbs=3350.0, mem_gb=80.0),
        GPUSpec("A100", tflops=312.0, mem_bw_gbs=2039.0, mem_gb=80.0),
        GPUSpec("L40S", tflops=362.0, mem_bw_gbs=864.0, mem_gb=48.0),
        GPUSpec("L4", tflops=121.0, mem_bw_gbs=300.0, mem_gb=24.0),
        GPUSpec("A10G", tflops=70.0, mem_bw_gbs=600.0, mem_gb=24.0),
        GPUSpec("A30", tflops=165.0, mem_bw_gbs=933.0, mem_gb=24.0),
        GPUSpec("V100", tflops=125.0, mem_bw_gbs=900.0, mem_gb=32.0),
        GPUSpec("A40", tflops=149.7, mem_bw_gbs=696.0, mem_gb=48.0),
        GPUSpec("RTX4090", tflops=165.2, mem_bw_gbs=1008.0, mem_gb=24.0),
        GPUSpec("RTXPRO6000", tflops=503.8, mem_bw_gbs=1792.0, mem_gb=96.0),
    )
}

GPU_ALIASES = {"H100-SXM": "H100", "H100_SXM": "H100", "A100-80G": "A100", "A100-80GB": "A100"}

MODELS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        ModelSpec("llama-3.1-8b", layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8,
                  head_dim=128, vocab=128256, params_b=8.03),
        ModelSpec("qwen2.5-7b", layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4,
                  head_dim=128, vocab=152064, params_b=7.62),
    )
}

REFERENCE_GPU = "A100"


def gpu(name: str) -> GPUSpec:
    """Look up a GPU by name (case-insensitive, common aliases accepted)."""
    key = GPU_ALIASES.get(name.upper(), GPU_ALIASES.get(name, name))
    for candidate in (key, key.upper()):
        if candidate in GPUS:
            return GPUS[candidate]
    raise KeyError(f"unknown GPU type {name!r}; known: {', '.join(sorted(GPUS))}")


def model(name: str) -> ModelSpec:
    """Look up a model by name (case-insensitive)."""
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(sorted(MODELS))}") from None


def relative_speed(gpu_type: str) -> float:
    """Peak compute relative to the reference GPU (A100 = 1.0); unknown types count as 1.0."""
    try:
        return gpu(gpu_type).tflops / GPUS[REFERENCE_GPU].tflops
    except KeyError:
        return 1.0
