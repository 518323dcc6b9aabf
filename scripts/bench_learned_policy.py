"""CPU per routing decision of the learned policies at a given cluster size, as ratios in one run.

    .venv/bin/python scripts/bench_learned_policy.py [--workers 8,64] [--calls 2000] [--reference REV]

Times `choose` (best of 5 repeats of the mean per call) on random views of a fixed mixed-GPU cluster:
today's `learned` policy as it is at git revision `--reference` (default: where this branch left main;
exported with `git archive` into a
temporary directory and run there in a subprocess, so its own feature code is timed), `learned` on this
tree, and `learned_prior` with the analytic estimate only (cold start) and with a trained ridge correction.
Each has a trained 2x64 MLP or ridge snapshot where it uses one. Prints microseconds per decision, the
ratio to the reference `learned`, and the host load (issue 11: within 1.5x of today's `learned` at 64
workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))
from bench_policies import per_call_us  # noqa: E402

from lodestar.cluster_view import ClusterView, RequestInfo  # noqa: E402
from lodestar.features import candidate_matrix  # noqa: E402
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


def trained_snapshot(samples: list[tuple[RequestInfo, ClusterView]], family: str, **params: object) -> Snapshot:
    """A validated snapshot of `family` trained on these views' feature rows (targets: noisy, positive)."""
    from learner.models import make_model

    x = np.concatenate([candidate_matrix(r, v) for r, v in samples[:200]])
    y = 50.0 * np.random.default_rng(0).lognormal(0.0, 1.0, len(x))
    model = make_model(family, **params)
    model.learn_many(x, y)
    snap = model.to_snapshot(1)
    return replace(snap, meta={**snap.meta, "validated": True})


def time_policies(n: int, calls: int, reference_only: bool) -> dict[str, float]:
    """Microseconds per decision of each policy on the same `calls` views of `n` workers."""
    from dispatcher.policies.learned import LearnedPolicy

    sample = views(n, calls, random.Random(n))
    policies = {"learned": LearnedPolicy(snapshot=trained_snapshot(sample, "mlp"))}
    if not reference_only:
        from dispatcher.policies.learned_prior import LearnedPriorPolicy

        policies["learned_prior, estimate only"] = LearnedPriorPolicy()
        policies["learned_prior, ridge correction"] = LearnedPriorPolicy(
            snapshot=trained_snapshot(sample, "ridge_residual"))
    return {name: per_call_us(lambda p=policy, s=sample: [p.choose(r, v) for r, v in s], calls)
            for name, policy in policies.items()}


def reference_times(rev: str, workers: list[int], calls: int) -> dict[int, float]:
    """`learned` as it is at git revision `rev`, timed in a subprocess on that tree."""
    root = SCRIPTS.parent
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(["git", "archive", rev], cwd=root, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        out = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--reference-only", "--calls", str(calls),
             "--workers", ",".join(map(str, workers))],
            cwd=tmp, env={**os.environ, "PYTHONPATH": tmp}, capture_output=True, text=True, check=True).stdout
    return {int(k): v for k, v in json.loads(out.splitlines()[-1]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="8,64")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--reference", default=None,
                        help="git revision whose `learned` is the reference (default: merge-base of HEAD and main)")
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if args.reference_only:
        print(json.dumps({n: time_policies(n, args.calls, True)["learned"] for n in workers}))
        return
    rev = args.reference or subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=SCRIPTS.parent,
                                           capture_output=True, text=True, check=True).stdout.strip()[:10]
    with open("/proc/loadavg") as f:
        print(f"host load (1/5/15 min): {' '.join(f.read().split()[:3])}")
    reference = reference_times(rev, workers, args.calls)
    for n in workers:
        base = reference[n]
        print(f"{n:3d} workers  {'learned @ ' + rev:34s} {base:8.1f} us/decision   1.00x")
        for name, us in time_policies(n, args.calls, False).items():
            print(f"{n:3d} workers  {name + ' (this tree)':34s} {us:8.1f} us/decision  {us / base:5.2f}x")
    with open("/proc/loadavg") as f:
        print(f"host load after (1/5/15 min): {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
