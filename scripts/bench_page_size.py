"""What the prefix cache's page size costs the engine model in CPU: hashing and engine steps per request.

    .venv/bin/python scripts/bench_page_size.py [--page-sizes 16,1] [--requests 400] [--rate 12] [--rounds 2]

Unique prompts of 2048 random token ids with 256 output tokens arrive as a Poisson stream into one
`Engine("H100")`, stepped one iteration at a time in virtual time as the emulator's runner steps it, until
the KV cache is full and evicting. Per page size it prints the wall time per request spent hashing the
prompt (`token_block_hashes`, as the emulator does on every request) and in `Engine.step`, and the
slowest single step, beside the host's load average. The rounds alternate the page sizes, so that a
change in host load shows as disagreement between rounds.
"""

from __future__ import annotations

import argparse
import os
import random
import time

from lodestar.hashing import token_block_hashes
from sim.engine import Engine, EngineRequest

PROMPT_TOKENS = 2048
OUTPUT_TOKENS = 256


def run(page: int, n: int, rate: float, seed: int) -> tuple[float, float, float]:
    """(hashing ms per request, engine steps ms per request, slowest step ms)."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in range(n):
        t += rng.expovariate(rate)
        arrivals.append((t, [rng.randrange(120_000) for _ in range(PROMPT_TOKENS)]))
    engine = Engine("H100")
    hashing = stepping = slowest = 0.0
    now, i = 0.0, 0
    while i < n or engine.has_work():
        if not engine.has_work():
            now = max(now, arrivals[i][0])
        while i < n and arrivals[i][0] <= now:
            start = time.perf_counter()
            hashes = tuple(token_block_hashes(arrivals[i][1], page))
            hashing += time.perf_counter() - start
            engine.add(EngineRequest(f"r{i}", PROMPT_TOKENS, hashes, page, OUTPUT_TOKENS, arrivals[i][0]),
                       arrivals[i][0])
            i += 1
        start = time.perf_counter()
        out = engine.step(now)
        took = time.perf_counter() - start
        stepping += took
        slowest = max(slowest, took)
        now += out.duration_s
    return hashing / n * 1e3, stepping / n * 1e3, slowest * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--page-sizes", default="16,1")
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--rate", type=float, default=12.0)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    pages = [int(p) for p in args.page_sizes.split(",")]
    print(f"{args.requests} unique {PROMPT_TOKENS}-token prompts, {OUTPUT_TOKENS} output tokens, Poisson "
          f"{args.rate}/s, H100 engine model; ms of wall time per request")
    print(f"{'round':>5s} {'page':>5s} {'hashing':>8s} {'steps':>7s} {'slowest step':>13s} {'load':>5s}")
    for r in range(args.rounds):
        for page in pages:
            hashing, steps, slowest = run(page, args.requests, args.rate, seed=r + 1)
            print(f"{r + 1:5d} {page:5d} {hashing:8.2f} {steps:7.2f} {slowest:13.1f} {os.getloadavg()[0]:5.1f}",
                  flush=True)


if __name__ == "__main__":
    main()
