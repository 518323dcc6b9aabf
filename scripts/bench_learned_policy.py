"""CPU per routing decision of the learned policy at a given cluster size, as ratios in one run.

    .venv/bin/python scripts/bench_learned_policy.py [--workers 8,64,256] [--calls 2000] [--reference REV]

Times `choose` (best of 5 repeats of the mean CPU time per call, the same timing for both trees) on random
views of a fixed mixed-GPU cluster: the `learned` policy as it is at git revision `--reference` (a 2x64
MLP snapshot; exported with `git archive` into a temporary directory and run there in a subprocess, so its
own feature code is timed), and `learned` on this tree with the analytic estimate only (cold start), with
a trained ridge correction of the GPU types (the default family), and with a ridge over every feature (the
full candidate matrix per decision). Prints microseconds per decision, decisions per CPU-second, the ratio
to the reference, and the host load (issue 11: within 1.5x of the old `learned` at 64 workers; issue 12:
>= 5,000 decisions per CPU-second at 64 workers).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.features import candidate_matrix
from lodestar.snapshot import Snapshot

SCRIPTS = Path(__file__).resolve().parent

# The last revision whose `learned` was the 2x64 MLP with epsilon-greedy exploration and a heuristic fallback.
REFERENCE = "7d48b34"
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


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    """Best of 5 repeats of the mean CPU time (this process's, `time.process_time`) per call, in microseconds:
    on a shared host the wall clock counts the time other processes held the core."""
    runs = []
    for _ in range(5):
        start = time.process_time()
        fn()
        runs.append((time.process_time() - start) / calls * 1e6)
    return min(runs)


def trained_snapshot(samples: list[tuple[RequestInfo, ClusterView]], family: str, **params: object) -> Snapshot:
    """A validated snapshot of `family` trained on these views' feature rows (targets: noisy, positive)."""
    try:
        from learner.models.registry import make_model
    except ImportError:  # a reference tree from before the model registry
        from learner.models import make_model as old_make_model

        def make_model(family: str, params: dict[str, object]) -> object:  # type: ignore[misc]
            return old_make_model(family, **params)

    x = np.concatenate([candidate_matrix(r, v) for r, v in samples[:200]])
    y = 50.0 * np.random.default_rng(0).lognormal(0.0, 1.0, len(x))
    model = make_model(family, dict(params))
    model.learn_many(x, y)
    snap = model.to_snapshot(1)
    return replace(snap, meta={**snap.meta, "validated": True})


def time_policies(n: int, calls: int, reference_only: bool) -> dict[str, float]:
    """Microseconds per decision of each policy on the same `calls` views of `n` workers."""
    from dispatcher.policies.learned import LearnedPolicy

    sample = views(n, calls, random.Random(n))
    if reference_only:  # the reference tree's `learned`, with a 2x64 MLP snapshot
        policy = LearnedPolicy()
        policy.load_snapshot(trained_snapshot(sample, "mlp"))
        policies = {"learned": policy}
    else:
        policies = {"learned, estimate only": LearnedPolicy()}
        for label, params in (("ridge of GPU types", {}), ("ridge of every feature", {"features": None})):
            policy = LearnedPolicy()
            policy.load_snapshot(trained_snapshot(sample, "ridge_residual", **params))
            policies[f"learned, {label}"] = policy
    times = {name: per_call_us(lambda p=policy, s=sample: [p.choose(r, v) for r, v in s], calls)
             for name, policy in policies.items()}
    if not reference_only:
        # What the dispatcher adds per decision when the policy handed back no feature row (estimate only, or
        # a model of the GPU figures and the estimate): the telemetry row, via the full candidate matrix.
        times["+ telemetry row (candidate matrix)"] = per_call_us(
            lambda s=sample: [candidate_matrix(r, v) for r, v in s], calls)
    return times


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
    parser.add_argument("--workers", default="8,64,256")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--reference", default=None,
                        help="git revision whose `learned` is the reference (default: 7d48b34, the MLP policy "
                             "with exploration and a heuristic fallback)")
    parser.add_argument("--reference-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    workers = [int(w) for w in args.workers.split(",")]
    if args.reference_only:
        print(json.dumps({n: time_policies(n, args.calls, True)["learned"] for n in workers}))
        return
    rev = args.reference or REFERENCE
    with open("/proc/loadavg") as f:
        print(f"host load (1/5/15 min): {' '.join(f.read().split()[:3])}")
    reference = reference_times(rev, workers, args.calls)
    for n in workers:
        base = reference[n]
        print(f"{n:3d} workers  {'learned @ ' + rev:34s} {base:8.1f} us/decision   1.00x")
        for name, us in time_policies(n, args.calls, False).items():
            print(f"{n:3d} workers  {name:34s} {us:8.1f} us/decision  {us / base:5.2f}x  "
                  f"{1e6 / us:8.0f} decisions/CPU-s")
    with open("/proc/loadavg") as f:
        print(f"host load after (1/5/15 min): {' '.join(f.read().split()[:3])}")


if __name__ == "__main__":
    main()
