"""CPU per routing decision of the learned policies at a given cluster size, as ratios in one run.

    .venv/bin/python scripts/bench_learned_policy.py [--workers 8,64] [--calls 2000]

Times `choose` (best of 5 repeats of the mean per call) on random views of a fixed mixed-GPU cluster for
today's `learned` policy with a trained MLP snapshot, and `learned_prior` with the analytic estimate only
(cold start) and with a trained residual MLP snapshot; prints microseconds per call, the ratio to
`learned` measured in the same run, and the host load beside them (issue 11: within 1.5x of `learned`
at 64 workers).
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_policies import per_call_us  # noqa: E402

from dispatcher.policies.learned import LearnedPolicy  # noqa: E402
from dispatcher.policies.learned_prior import PRIOR, LearnedPriorPolicy  # noqa: E402
from learner.models import MLPModel  # noqa: E402
from lodestar.cluster_view import ClusterView, RequestInfo  # noqa: E402
from lodestar.features import FEATURE_INDEX, candidate_matrix  # noqa: E402
from lodestar.snapshot import Snapshot  # noqa: E402

GPUS = ("H100", "A100", "L40S", "L4", "A10G", "A30")


def views(n: int, count: int, rng: random.Random) -> list[tuple[RequestInfo, ClusterView]]:
    """Random loads and prefix matches over one fixed cluster of `n` workers (GPU types cycle)."""
    ids = [f"w{i}" for i in range(n)]
    types = [GPUS[i % len(GPUS)] for i in range(n)]
    out = []
    for t in range(count):
        prompt = rng.randint(16, 8000)
        req = RequestInfo(f"r{t}", prompt, tuple(range(prompt // 16)), 16, None, rng.randint(16, 512))
        arr = lambda hi: np.array([rng.random() * hi for _ in range(n)])  # noqa: E731
        out.append((req, ClusterView(
            worker_ids=ids, gpu_types=types, running=arr(30).round(), waiting=arr(10).round(),
            inflight=arr(50).round(), pending_prefill_tokens=arr(20000).round(), kv_usage=arr(1.0),
            max_kv_tokens=np.full(n, 400_000.0), recent_ttft_ms=arr(500),
            matched_prefix_tokens=(arr(prompt) // 16) * 16, now_ms=100.0 * t)))
    return out


def trained_snapshot(samples: list[tuple[RequestInfo, ClusterView]], **mlp: object) -> Snapshot:
    """A validated 2x64 MLP snapshot trained on these views' feature rows (targets: the estimate, noisy)."""
    x = np.concatenate([candidate_matrix(r, v) for r, v in samples[:200]])
    y = x[:, FEATURE_INDEX[PRIOR]] * np.random.default_rng(0).lognormal(0.0, 0.3, len(x))
    model = MLPModel(**mlp)  # type: ignore[arg-type]
    model.learn_many(x, y)
    snap = model.to_snapshot(1)
    return replace(snap, meta={**snap.meta, "validated": True})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="8,64")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        print(f"host load (1/5/15 min): {' '.join(f.read().split()[:3])}")
    for n in (int(w) for w in args.workers.split(",")):
        rng = random.Random(n)
        sample = views(n, args.calls, rng)
        learned = LearnedPolicy(snapshot=trained_snapshot(sample))
        policies = {
            "learned (mlp)": learned,
            "learned_prior, estimate only": LearnedPriorPolicy(),
            "learned_prior, residual mlp": LearnedPriorPolicy(
                snapshot=trained_snapshot(sample, residual_feature=PRIOR)),
        }
        times = {}
        for name, policy in policies.items():
            times[name] = per_call_us(lambda p=policy, s=sample: [p.choose(r, v) for r, v in s], args.calls)
        base = times["learned (mlp)"]
        for name, us in times.items():
            print(f"{n:3d} workers  {name:32s} {us:8.1f} us/decision  {us / base:5.2f}x learned")


if __name__ == "__main__":
    main()
