"""Simulator speed benchmark: simulated requests per wall-clock (and CPU) second.

    .venv/bin/python -m sim.speed --cluster configs/clusters/hetero_2h100_2a100_4l4.yaml \
        --workload configs/workloads/mooncake_conversation.yaml --policy least_request --rate 25 --repeats 3

Generates the request stream once up front (so the figure is the simulator's, not the trace reader's),
then times `Simulator.run` `repeats` times and prints each run and the best: on a shared machine the
best run is the closest to the uncontended speed.
"""

from __future__ import annotations

import argparse
import time

from sim.cluster import read_cluster
from sim.policy_factory import PolicySpec, build_sim_policy
from sim.simulator import Simulator
from sim.workloads import load_workload


def main() -> None:
    """Parse arguments, run, print."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cluster", required=True)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--policy", default="least_request")
    ap.add_argument("--rate", type=float, default=None)
    ap.add_argument("--duration", type=float, default=300.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cluster = read_cluster(args.cluster)
    work = load_workload(args.workload).with_duration(args.duration).with_rate(args.rate)
    requests = list(work.requests(args.seed))
    best_wall = best_cpu = 0.0
    for k in range(args.repeats):
        policy = build_sim_policy(PolicySpec.parse(args.policy), seed=args.seed).policy
        sim = Simulator(cluster, policy, seed=args.seed)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        result = sim.run(requests, work.slowdowns)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        n = result.arrivals
        best_wall, best_cpu = max(best_wall, n / wall), max(best_cpu, n / cpu)
        print(f"run {k + 1}: {n} requests, {result.steps / n:.1f} engine steps each, {wall:.2f} s wall, "
              f"{cpu:.2f} s CPU -> {n / wall:,.0f} req/s wall, {n / cpu:,.0f} req/CPU-s")
    print(f"best: {best_wall:,.0f} simulated req/s wall, {best_cpu:,.0f} per CPU second "
          f"({cluster.name}, {len(cluster.expand())} engines, {work.name}, {args.policy})")


if __name__ == "__main__":
    main()
