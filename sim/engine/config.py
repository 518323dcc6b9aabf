"""Engine knobs with SGLang's defaults, and how SGLang derives the memory-dependent ones.

Defaults follow SGLang 0.5.x `server_args.py` (`_handle_gpu_memory_settings`): chunked_prefill_size and
cuda_graph_max_bs by GPU memory tier, then mem_fraction_static = (memory - reserved) / memory with
reserved = 512 MiB + 1.5 MiB per chunked-prefill token + 2 MiB per CUDA-graph batch slot + 1/8 GiB per
TP rank (at least 10 GiB above 60 GiB of memory). The scheduler constants are those of
`scheduler.py`/`schedule_policy.py` (init/min new-token ratio, decay steps, retract steps, the clip of
max_new_tokens in the admission estimate) and `model_runner.py` (max_running_requests).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from lodestar.hardware import GPUSpec, ModelSpec

# Memory as the driver reports it (MiB), which SGLang's tiers and fractions use; commonly seen
# nvidia-smi totals. GPUs not listed fall back to the nominal GiB size.
REPORTED_MEMORY_MIB = {
    "H100": 81559, "A100": 81920, "L40S": 46068, "A40": 46068, "L4": 23034, "A10G": 23028,
    "RTX4090": 24564, "A30": 24576, "V100": 32768,
}
# CUDA context, cuBLAS workspace and other memory outside the torch pools, taken before the KV pool
# is sized (an assumption; SGLang measures it at start-up).
NON_TORCH_OVERHEAD_GIB = 0.75
CONTEXT_LEN = {"llama-3.1-8b": 131072, "qwen2.5-7b": 32768}


def reported_memory_mib(g: GPUSpec) -> int:
    """The GPU's memory as the driver reports it, in MiB."""
    return REPORTED_MEMORY_MIB.get(g.name, int(g.mem_gb * 1024))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """SGLang server arguments that shape scheduling. None = derive as SGLang does for the GPU."""

    chunked_prefill_size: int | None = None  # <= 0 disables chunking
    max_prefill_tokens: int = 16384
    max_running_requests: int | None = None
    mem_fraction_static: float | None = None
    cuda_graph_max_bs: int | None = None
    schedule_policy: Literal["fcfs", "lpm"] = "fcfs"
    schedule_conservativeness: float = 1.0
    max_queued_requests: int | None = None
    enable_mixed_chunk: bool = False
    disable_radix_cache: bool = False
    tp_size: int = 1
    context_len: int | None = None
    # scheduler constants (SGLang environment defaults)
    init_new_token_ratio: float = 0.7
    min_new_token_ratio_factor: float = 0.14
    new_token_ratio_decay_steps: int = 600
    retract_decode_steps: int = 20
    clip_max_new_tokens: int = 4096
    decode_log_interval: int = 40  # decode iterations per gen_throughput measurement
    step_time_jitter: float = 0.0  # relative std-dev of lognormal noise on step times (seeded); 0 = none

    def resolved(self, g: GPUSpec, m: ModelSpec) -> EngineConfig:
        """A copy with every memory-dependent default filled in for GPU `g` serving model `m`."""
        mem = reported_memory_mib(g)
        chunk, graph_bs = _memory_tier(mem, self.tp_size)
        chunk = self.chunked_prefill_size if self.chunked_prefill_size is not None else chunk
        graph_bs = self.cuda_graph_max_bs if self.cuda_graph_max_bs is not None else graph_bs
        frac = self.mem_fraction_static
        if frac is None:
            reserved = 512 + max(chunk if chunk > 0 else self.max_prefill_tokens, 2048) * 1.5
            reserved += graph_bs * 2 + self.tp_size / 8 * 1024
            if mem > 60 * 1024:
                reserved = max(reserved, 10 * 1024)
            frac = round((mem - reserved) / mem, 3)
        return replace(self, chunked_prefill_size=chunk, cuda_graph_max_bs=graph_bs, mem_fraction_static=frac,
                       context_len=self.context_len or CONTEXT_LEN.get(m.name, 32768))


def _memory_tier(mem_mib: int, tp_size: int) -> tuple[int, int]:
    """SGLang's (chunked_prefill_size, cuda_graph_max_bs) for a GPU with `mem_mib` MiB."""
    if mem_mib < 20 * 1024:
        return 2048, 8
    if mem_mib < 35 * 1024:
        return 2048, 24 if tp_size < 4 else 80
    if mem_mib < 60 * 1024:
        return 4096, 32 if tp_size < 4 else 160
    if mem_mib < 160 * 1024:
        return 8192, 256 if tp_size < 4 else 512
    return 16384, 512


def kv_token_budget(g: GPUSpec, m: ModelSpec, mem_fraction_static: float) -> int:
    """KV cache tokens: (memory * mem_fraction_static - weights - non-torch overhead) / KV bytes per token."""
    mem_bytes = reported_memory_mib(g) * 1024**2
    free = mem_bytes * mem_fraction_static - m.weight_bytes - NON_TORCH_OVERHEAD_GIB * 1024**3
    tokens = int(free // m.kv_bytes_per_token)
    if tokens <= 0:
        raise ValueError(f"{m.name} does not fit on {g.name} at mem_fraction_static={mem_fraction_static}")
    return tokens


def max_running_requests(cfg: EngineConfig, max_kv_tokens: int) -> int:
    """SGLang's default: min(max_total_tokens // 2, req_to_token pool size)."""
    if cfg.max_running_requests is not None:
        return cfg.max_running_requests
    context_len = cfg.context_len or 32768
    pool = min(max(int(max_kv_tokens / context_len * 512), 2048), 4096)
    return max(1, min(max_kv_tokens // 2, pool))

