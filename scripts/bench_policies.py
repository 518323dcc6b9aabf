"""Time the baseline policies' `choose` and the in-memory prefix index's `match` / `insert`.

    .venv/bin/python scripts/bench_policies.py [--workers 8,64] [--calls 5000] [--blocks 256]

Prints microseconds per call (best of 5 repeats: the least disturbed by other load) for every
baseline (every policy that needs no model) on random cluster views, then the prefix index on chained hashes sharing
prefixes, at a capacity that keeps it evicting.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np

from dispatcher.policies.registry import heuristic_names, make_policy
from dispatcher.prefix_index import InMemoryPrefixIndex
from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.hashing import trace_block_hashes


def views(n: int, count: int, rng: random.Random) -> list[tuple[RequestInfo, ClusterView]]:
    """Random (request, view) pairs over `n` workers."""
    gpus = ["H100", "A100", "L40S", "L4"]
    out = []
    for t in range(count):
        prompt = rng.randint(16, 8000)
        req = RequestInfo(f"r{t}", prompt, tuple(range(prompt // 16)), 16)
        arr = lambda hi: np.array([rng.random() * hi for _ in range(n)])  # noqa: E731
        out.append((req, ClusterView(
            worker_ids=[f"w{i}" for i in range(n)], gpu_types=[rng.choice(gpus) for _ in range(n)],
            running=arr(30).round(), waiting=arr(10).round(), inflight=arr(50).round(),
            pending_prefill_tokens=arr(20000).round(), kv_usage=arr(1.0), max_kv_tokens=np.full(n, 400_000.0),
            recent_ttft_ms=arr(500), matched_prefix_tokens=(arr(prompt) // 16) * 16, now_ms=100.0 * t,
        )))
    return out


def per_call_us(fn, calls: int) -> float:
    """Best of 5 repeats of the mean time per call, in microseconds."""
    runs = []
    for _ in range(5):
        start = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="8,64")
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--blocks", type=int, default=256)
    args = parser.parse_args()
    rng = random.Random(0)
    sizes = [int(x) for x in args.workers.split(",")]
    pools = {n: views(n, args.calls, rng) for n in sizes}
    print(f"{'policy':<22}" + "".join(f"{f'{n} workers (us)':>18}" for n in sizes))
    for name in heuristic_names():
        row = []
        for n in sizes:
            policy, pool = make_policy(name, seed=1), pools[n]
            row.append(per_call_us(lambda p=policy, pool=pool: [p.choose(r, v) for r, v in pool], len(pool)))
        print(f"{name:<22}" + "".join(f"{x:>18.1f}" for x in row))

    prefixes = [[rng.getrandbits(32) for _ in range(args.blocks // 2)] for _ in range(32)]
    chains = [tuple(trace_block_hashes(rng.choice(prefixes) + [rng.getrandbits(32) for _ in range(args.blocks // 2)]))
              for _ in range(2000)]
    for n in sizes:
        index = InMemoryPrefixIndex(capacity_blocks=20 * args.blocks)
        workers = [f"w{i}" for i in range(n)]
        for c in chains[:1000]:
            index.insert(rng.choice(workers), c, 0.0)
        ins = per_call_us(lambda i=index, w=workers: [i.insert(w[k % len(w)], c, float(k))
                                                      for k, c in enumerate(chains)], len(chains))
        mat = per_call_us(lambda i=index, w=workers: [i.match(c, w) for c in chains], len(chains))
        print(f"prefix index, {n} workers, {args.blocks}-block chains: insert {ins:.1f} us, match {mat:.1f} us")


if __name__ == "__main__":
    main()
