"""Benchmark the engine model: fidelity against the profiles, and its own speed.

    .venv/bin/python scripts/bench_engine.py [--requests 3000] [--gpus H100,L4]

1. Idle TTFT and TPOT of a 1k/4k/16k-token prompt on every GPU, beside the profile-derived expectation
   (measured GPUs only: interpolated kernel profiles, see sim/engine/profiles.py; from the committed
   calibration references when the data directory is absent).
2. Engine speed on this machine: single iterations per wall second under load, and simulated requests
   per wall second on one engine under a Poisson load at 60% of its saturated throughput, stepped
   single or as the simulator steps it (decode iterations fused up to the next arrival).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import zlib

from lodestar import hardware
from lodestar.hashing import trace_block_hashes
from lodestar.settings import Settings
from sim.engine import Engine, EngineRequest, PerfModel
from sim.engine.perf_model import load_calibration
from sim.engine.profiles import MEASURED_GPUS, ProfileReference, load_profiles

PROMPTS = (1024, 4096, 16384)
DECODE_TOKENS = 33
BLOCK = 16


def request(rid: str, prompt: int, arrival: float, max_new: int, group: int = 0, shared: int = 0) -> EngineRequest:
    """Blocks [0, shared) are common to the group; the rest are unique to the request."""
    n = prompt // BLOCK
    ids = [group * 1_000_003 + i for i in range(min(shared, n))]
    ids += [zlib.crc32(f"{rid}:{i}".encode()) << 20 for i in range(len(ids), n)]
    return EngineRequest(rid, prompt, tuple(trace_block_hashes(ids)), BLOCK, max_new, arrival)


def idle_ttft_tpot(gpu: str, prompt: int) -> tuple[float, float]:
    """(TTFT, mean TPOT) of one request alone on a fresh engine, in seconds."""
    e = Engine(gpu)
    e.add(request("a", prompt, 0.0, DECODE_TOKENS), 0.0)
    t = 0.0
    first = None
    while e.has_work():
        out = e.step(t)
        t += out.duration_s
        if out.first_tokens:
            first = t
    assert first is not None
    return first, (t - first) / (DECODE_TOKENS - 1)


def expectations(gpu: str) -> dict[int, tuple[float, float]]:
    """Profile-derived (TTFT, TPOT) per prompt length; empty for GPUs without measurements."""
    if gpu not in MEASURED_GPUS:
        return {}
    llama = hardware.model("llama-3.1-8b")
    profiles = load_profiles(Settings().data_dir, llama)
    engine = Engine(gpu)
    out: dict[int, tuple[float, float]] = {}
    if gpu in profiles:
        ref = ProfileReference(profiles[gpu], llama, PerfModel(gpu))
        for p in PROMPTS:
            ttft = ref.ttft(p, engine.cfg.chunked_prefill_size)
            tpot = statistics.mean(ref.decode_step(p + i) for i in range(DECODE_TOKENS - 1))
            out[p] = (ttft or float("nan"), tpot)
        return out
    refs = load_calibration()["reference"][gpu]
    for p in PROMPTS:
        out[p] = (refs["ttft"][str(p)]["reference_s"], refs["tpot"][str(p)]["reference_s"])
    return out


def fidelity_table(gpus: list[str]) -> None:
    print("Idle TTFT / TPOT, Llama-3.1-8B (engine model vs profile-derived expectation; - = no profile)")
    print(f"{'GPU':<11}{'prompt':>7} {'TTFT ms':>9} {'expect':>9} {'err%':>6}  "
          f"{'TPOT ms':>8} {'expect':>8} {'err%':>6}")
    for gpu in gpus:
        exp = expectations(gpu)
        for p in PROMPTS:
            ttft, tpot = idle_ttft_tpot(gpu, p)
            if p in exp:
                et, ed = exp[p]
                extra = (f"{et * 1e3:9.1f} {100 * (ttft / et - 1):+6.1f}  {tpot * 1e3:8.2f} {ed * 1e3:8.2f} "
                         f"{100 * (tpot / ed - 1):+6.1f}")
            else:
                extra = f"{'-':>9} {'':>6}  {tpot * 1e3:8.2f} {'-':>8}"
            print(f"{gpu:<11}{p:>7} {ttft * 1e3:9.1f} " + extra)


def chat_requests(n: int, rate: float, seed: int) -> list[EngineRequest]:
    """Shared-prefix chat-like requests arriving as a Poisson process of `rate` per second."""
    rng = random.Random(seed)
    reqs, t = [], 0.0
    for i in range(n):
        t += rng.expovariate(rate) if rate > 0 else 0.0
        shared = rng.choice((0, 64, 128))  # blocks of a system prompt shared by the group
        prompt = shared * BLOCK + rng.randint(200, 1800)
        reqs.append(request(f"r{i}", prompt, t, rng.randint(16, 512), group=rng.randint(1, 8), shared=shared))
    return reqs


def capacity(gpu: str, seed: int) -> float:
    """Requests per simulated second the engine completes when 400 of them arrive at once."""
    reqs = chat_requests(400, 0.0, seed)
    e = Engine(gpu)
    for r in reqs:
        e.add(r, 0.0)
    now = 0.0
    while e.has_work():
        now += e.step(now, float("inf")).duration_s
    return len(reqs) / now


def drive(engine: Engine, reqs: list[EngineRequest], fuse: bool) -> tuple[int, list[float]]:
    """Run the requests to completion; returns (steps, TTFTs)."""
    now, i, steps = 0.0, 0, 0
    first: dict[str, float] = {}
    while i < len(reqs) or engine.has_work():
        while i < len(reqs) and reqs[i].arrival_s <= now:
            engine.add(reqs[i], now)
            i += 1
        if not engine.has_work():
            now = reqs[i].arrival_s
            continue
        until = reqs[i].arrival_s if i < len(reqs) else float("inf")
        out = engine.step(now, until if fuse else None)
        now += out.duration_s
        steps += 1
        for ft in out.first_tokens:
            first[ft.rid] = now
    return steps, [first[r.rid] - r.arrival_s for r in reqs]


def speed_table(gpus: list[str], n: int) -> None:
    print(f"\nEngine speed on this machine ({n} requests at 60% of the saturated throughput, block {BLOCK} tokens)")
    print(f"{'GPU':<11}{'mode':<8}{'rate/s':>7}{'wall s':>8}{'steps/s':>10}{'req/s':>9}{'sim s':>8}{'TTFT p50 ms':>12}")
    for gpu in gpus:
        rate = 0.6 * capacity(gpu, seed=2)
        reqs = chat_requests(n, rate, seed=1)
        for fuse in (False, True):
            e = Engine(gpu)
            w = time.perf_counter()
            steps, ttfts = drive(e, reqs, fuse)
            w = time.perf_counter() - w
            mode = "fused" if fuse else "single"
            print(f"{gpu:<11}{mode:<8}{rate:7.2f}{w:8.2f}{steps / w:10.0f}{n / w:9.0f}{reqs[-1].arrival_s:8.0f}"
                  f"{statistics.median(ttfts) * 1e3:12.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--gpus", default=",".join(hardware.GPUS))
    ap.add_argument("--speed-gpus", default="H100,L4")
    args = ap.parse_args()
    fidelity_table([g for g in args.gpus.split(",") if g])
    speed_table([g for g in args.speed_gpus.split(",") if g], args.requests)


if __name__ == "__main__":
    main()
