"""Benchmark one dispatcher process on the real broker and Redis over loopback.

    .venv/bin/python scripts/bench_dispatcher.py [--workers 8,64,256] [--requests 15000] [--rates 500]
        [--duration 20] [--policy learned] [--min-model-share 0.9] [--profile DIR] [--keep]

The dispatcher runs in its own process (the production `Dispatcher` class, with its per-batch hook
timed); this process registers fake workers (a heartbeat per second with changing load, as the worker
service would), produces the requests and watches the dispatcher's committed offsets.

1. Throughput, for each worker count: requests are produced first (512-token prompts, 3/4 of them a
   shared 384-token system prompt out of 24), then the dispatcher starts; routed requests per second
   from its first consumed batch to its last acknowledged publish, the dispatcher process's CPU
   time per routed request (what it would sustain on one free core), and the Redis server's CPU time
   per routed request (INFO cpu over the run: the prefix index and registry work done there; the server
   is shared, so anything else using it meanwhile counts too).
2. Routing overhead at steady rates (default 500 req/s, 8 workers): per request, from the moment its
   batch was consumed to the moment every publish of the batch was acknowledged (the commit follows);
   p50/p99 over all requests, and the batch sizes seen.
With `--policy learned` (default) a validated river snapshot trained on synthetic telemetry whose ranges
cover the bench's traffic is published first, so the dispatcher routes with the model; the model-vs-
fallback split is printed and the run fails if the model made fewer than `--min-model-share` of the
decisions (the fallback decides for a pick outside the training range). Every topic and Redis key made
here is deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import multiprocessing as mp
import os
import random
import secrets
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from aiokafka import AIOKafkaProducer, TopicPartition

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from app.namespace import remove_namespace  # noqa: E402
from lodestar.cluster_view import ClusterView, RequestInfo  # noqa: E402
from lodestar.features import FEATURE_INDEX, candidate_matrix  # noqa: E402
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions  # noqa: E402
from lodestar.kafka_io import make_consumer, make_producer  # noqa: E402
from lodestar.names import RedisKeys, Topics  # noqa: E402
from lodestar.redis_io import make_redis  # noqa: E402
from lodestar.schemas import InferenceRequest, WorkerState  # noqa: E402
from lodestar.settings import Settings  # noqa: E402
from lodestar.snapshot_keys import signing_key  # noqa: E402
from lodestar.snapshot_store import SnapshotStore  # noqa: E402
from lodestar.worker_registry import WorkerRegistry  # noqa: E402

GPUS = ("H100", "A100", "L40S", "L4")
PROMPT_TOKENS = 512
SYSTEM_TOKENS = 384
N_SYSTEM_PROMPTS = 24


def bench_settings(policy: str) -> Settings:
    """Settings on fresh topic, key and group names and a snapshot key of the run's own, so nothing else is
    disturbed."""
    tag = f"bench{uuid.uuid4().hex[:8]}"
    return Settings(
        kafka={"topic_prefix": f"{tag}."},
        redis={"key_prefix": f"{tag}:"},
        dispatcher={"consumer_group": f"{tag}-dispatchers", "policy": policy, "dispatcher_id": "bench"},
        snapshot_signing={"key_id": tag, "key": secrets.token_hex(32)},
    )


# --------------------------------------------------------------------------- the dispatcher process


def _dispatcher_process(settings: Settings, stop: Any, results: Any, profile: str | None = None,
                        watch_lag: bool = False) -> None:
    """Child process: run the production Dispatcher with its batch hook timed, on the event loop the
    `lodestar dispatcher` command runs it on (uvloop), until `stop` is set; with `profile`, under cProfile
    from the first consumed batch on, stats written to that path; with `watch_lag`, beside a task timing
    the event loop's lateness (a 2 ms sleep, 500 wake-ups a second: CPU of its own, so not in the
    throughput runs, whose CPU per request it would inflate)."""
    from app.commands.event_loop import run_service
    from dispatcher.routing import BatchPlan
    from dispatcher.service import Dispatcher

    class TimedDispatcher(Dispatcher):
        samples: list[tuple[int, float, float]]
        cpu: list[float]

        def _batch_routed(self, plan: BatchPlan, started_at: float) -> None:
            if profiler is not None and not self.samples:
                profiler.enable()  # from the end of the first batch: imports and start-up are not the hot path
            super()._batch_routed(plan, started_at)
            end = time.perf_counter()
            self.samples.append((len(plan.routed), started_at, end))
            self.cpu.append(time.process_time())
            for r in plan.routed:
                self.policies[r.decision.policy] += 1

        async def _on_snapshot(self, snapshot: Any) -> None:
            before = self.model_version
            await super()._on_snapshot(snapshot)
            if self.model_version != before:
                self.swaps.append(time.perf_counter())

    async def lag_monitor(lags: list[tuple[float, float]], period_s: float = 0.002) -> None:
        """How late the event loop wakes a 2 ms sleep: the stall of whatever ran in between."""
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(period_s)
            t1 = time.perf_counter()
            lags.append((t1, (t1 - t0 - period_s) * 1e3))

    async def main() -> None:
        service = TimedDispatcher(settings)
        service.samples = []
        service.cpu = []
        service.policies = Counter()
        service.swaps = []
        lags: list[tuple[float, float]] = []
        monitor = asyncio.create_task(lag_monitor(lags)) if watch_lag else None
        done = asyncio.Event()
        task = asyncio.create_task(service.run(done))
        while not stop.is_set():
            await asyncio.sleep(0.05)
            if task.done():
                break
        done.set()
        await task
        if monitor is not None:
            monitor.cancel()
        # the stall a swap causes: the event loop's worst lateness within 100 ms after each swap completed
        # (the announcement's read, verification and decoding run just before the swap itself)
        swap_lags = [max((lag for t, lag in lags if s - 0.1 <= t <= s + 0.1), default=0.0) for s in service.swaps]
        results.put({"samples": service.samples, "cpu": service.cpu, "policies": dict(service.policies),
                     "model_version": service.model_version, "swap_lag_ms": swap_lags,
                     "lag_p99_ms": float(np.percentile([lag for _, lag in lags], 99)) if lags else 0.0})

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    run_service(main())
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)


class DispatcherProcess:
    """Start/stop the child and collect its timings."""

    def __init__(self, settings: Settings, profile: str | None = None, watch_lag: bool = False):
        ctx = mp.get_context("spawn")
        self.stop = ctx.Event()
        self.results = ctx.Queue()
        # the settings object itself (a JSON dump would mask its secrets), pickled to our own child process
        self.proc = ctx.Process(target=_dispatcher_process,
                                args=(settings, self.stop, self.results, profile, watch_lag))

    def start(self) -> None:
        self.proc.start()

    def finish(self) -> dict[str, Any]:
        self.stop.set()
        out = self.results.get(timeout=60)
        self.proc.join(30)
        return out


# --------------------------------------------------------------------------- fake workers and load


class FakeWorkers:
    """Registry entries for `n` workers, heartbeated every second with a changing load."""

    def __init__(self, settings: Settings, n: int, seed: int = 0):
        self.client = make_redis(settings)
        self.registry = WorkerRegistry(self.client, RedisKeys(settings.redis.key_prefix), settings.worker.state_ttl_s)
        self.topics = Topics(settings.kafka.topic_prefix)
        self.ids = [f"w{i:02d}" for i in range(n)]
        self.rng = random.Random(seed)
        self.task: asyncio.Task[None] | None = None

    def state(self, i: int, wid: str) -> WorkerState:
        r = self.rng
        return WorkerState(worker_id=wid, gpu_type=GPUS[i % len(GPUS)], topic=self.topics.worker(wid),
                           running=r.randint(0, 16), waiting=r.randint(0, 4), inflight=r.randint(0, 8),
                           pending_prefill_tokens=r.randint(0, 8000), kv_usage=r.uniform(0.05, 0.9),
                           max_kv_tokens=400_000, recent_ttft_ms=r.uniform(30, 400))

    async def beat_once(self) -> None:
        for i, wid in enumerate(self.ids):
            await self.registry.publish(self.state(i, wid))

    async def _beat(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            await self.beat_once()

    async def start(self, settings: Settings) -> None:
        await ensure_topics(settings, {self.topics.worker(w): 1 for w in self.ids})
        await self.beat_once()
        self.task = asyncio.create_task(self._beat())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        await self.client.aclose()


def make_requests(n: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    systems = [rng.integers(0, 32000, SYSTEM_TOKENS).tolist() for _ in range(N_SYSTEM_PROMPTS)]
    out = []
    for _ in range(n):
        if rng.random() < 0.75:
            ids = systems[int(rng.integers(N_SYSTEM_PROMPTS))] + rng.integers(0, 32000, PROMPT_TOKENS - SYSTEM_TOKENS
                                                                               ).tolist()
        else:
            ids = rng.integers(0, 32000, PROMPT_TOKENS).tolist()
        out.append(InferenceRequest(input_ids=ids).to_bytes())
    return out


async def produce_all(producer: AIOKafkaProducer, topic: str, payloads: list[bytes]) -> None:
    for start in range(0, len(payloads), 2000):
        futs = [await producer.send(topic, p, key=uuid.uuid4().bytes) for p in payloads[start:start + 2000]]
        await asyncio.gather(*futs)


async def produce_at_rate(producer: AIOKafkaProducer, topic: str, payloads: list[bytes], rate: float) -> float:
    """Send at `rate` per second (ticks of 10 ms); returns the achieved rate."""
    per_tick = rate / 100.0
    t0 = time.perf_counter()
    sent, futs = 0, []
    while sent < len(payloads):
        due = min(len(payloads), int((time.perf_counter() - t0) * 100 * per_tick) + 1)
        while sent < due:
            futs.append(await producer.send(topic, payloads[sent], key=uuid.uuid4().bytes))
            sent += 1
        await asyncio.sleep(0.01)
    await asyncio.gather(*futs)
    return len(payloads) / (time.perf_counter() - t0)


async def committed_total(settings: Settings, topic: str) -> int:
    consumer = make_consumer(settings, group_id=settings.dispatcher.consumer_group, client_id="bench-committed")
    await consumer.start()
    try:
        total = 0
        for p in range(settings.kafka.request_partitions):
            total += await consumer.committed(TopicPartition(topic, p)) or 0
        return total
    finally:
        await consumer.stop()


async def wait_committed(settings: Settings, topic: str, n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while (got := await committed_total(settings, topic)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {got}/{n} requests committed after {timeout:.0f} s")
        await asyncio.sleep(0.5)


# --------------------------------------------------------------------------- the model snapshot


def training_view(rng: np.random.Generator, gpu: str) -> ClusterView:
    """One worker's state as the bench's traffic shows it to the dispatcher: the fake workers' heartbeat
    ranges (FakeWorkers.state, with its 400k-token KV cache) plus the dispatcher's own recent assignments
    on top (in-flight and pending prefill grow by up to about a second of traffic per worker)."""
    view = ClusterView.empty_like(["w"], [gpu])
    view.running[:] = rng.integers(0, 17)
    view.waiting[:] = rng.integers(0, 5)
    view.inflight[:] = rng.integers(0, 1200)
    view.pending_prefill_tokens[:] = rng.integers(0, 600_000)
    view.kv_usage[:] = rng.uniform(0.0, 0.95)
    view.max_kv_tokens[:] = 400_000
    view.recent_ttft_ms[:] = rng.uniform(10, 500)
    view.matched_prefix_tokens[:] = rng.integers(0, PROMPT_TOKENS + 1)
    return view


async def republish_snapshots(settings: Settings, every_s: float) -> None:
    """Publish a new version of a trained snapshot every `every_s` (the dispatcher hot-swaps each while it
    routes: the swap stall is measured in its process)."""
    while True:
        await asyncio.sleep(every_s)
        await publish_trained_snapshot(settings, quiet=True)


@functools.cache
def trained_snapshot() -> Any:
    """A river learner trained on synthetic telemetry whose feature ranges cover the bench's traffic (so the
    model, not the fallback, decides: the split is asserted after each run), as a snapshot."""
    from learner.trainer import LearnerConfig, make_learner

    rng = np.random.default_rng(1)
    learner = make_learner("river", LearnerConfig())
    for i in range(3000):
        view = training_view(rng, GPUS[i % len(GPUS)])
        x = candidate_matrix(RequestInfo("r", prompt_tokens=int(rng.integers(16, 2048))), view)[0]
        ttft = 15.0 + 0.04 * x[FEATURE_INDEX["backlog_tokens_per_speed"]] + 20.0 * x[FEATURE_INDEX["queue_per_speed"]]
        learner.observe(x, float(ttft), float(i))
    snapshot = learner.snapshot(3000.0)
    if not snapshot.validated:
        raise RuntimeError("the bench's snapshot failed held-out validation: the learned policy would not use it")
    return snapshot


async def publish_trained_snapshot(settings: Settings, quiet: bool = False) -> int:
    """Publish the trained snapshot under a version newer than any before (the time in ms)."""
    snapshot = replace(trained_snapshot(), version=time.time_ns() // 1_000_000)
    client = make_redis(settings)
    try:
        await SnapshotStore(client, RedisKeys(settings.redis.key_prefix), signing_key=signing_key(settings)
                            ).publish(snapshot)
    finally:
        await client.aclose()
    if not quiet:
        print(f"  published snapshot v{snapshot.version} (river, validated={snapshot.validated})")
    return snapshot.version


def swap_work_ms(settings: Settings, repeats: int = 200) -> tuple[float, float]:
    """The synchronous work of one hot-swap, as the dispatcher does it on its event loop: verify and decode
    the stored payload (lodestar.snapshot.decode) and load it into the learned policy; (median, max) ms."""
    from dispatcher.service import build_policy
    from lodestar import snapshot as codec
    from lodestar.snapshot_keys import verification_keys

    snapshot = trained_snapshot()
    payload = codec.encode(snapshot, signing_key(settings))
    keys = verification_keys(settings)
    policy = build_policy("learned", settings)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        policy.load_snapshot(codec.decode(payload, keys))  # type: ignore[attr-defined]
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), max(times)


def model_share(policies: dict[str, int]) -> float:
    """The fraction of decisions the learned model made (label `learned`; where the policy kept to the analytic
    estimate they are `learned/analytic`)."""
    total = sum(policies.values())
    return policies.get("learned", 0) / total if total else 0.0


def check_split(policies: dict[str, int], policy: str, min_share: float) -> str:
    """The model-vs-fallback split as text; with the learned policy, fail unless the model made the decisions."""
    total = sum(policies.values())
    share = model_share(policies)
    text = f"model {share:.1%} / fallback {1 - share:.1%} of {total}"
    if policy == "learned" and share < min_share:
        raise SystemExit(f"the learned model made only {share:.1%} of the decisions (need {min_share:.0%}): "
                         f"{policies}; the bench would measure the fallback")
    return text


# --------------------------------------------------------------------------- phases


async def redis_cpu_s(client: Any) -> float:
    """The Redis server's CPU seconds so far (user + system, INFO cpu): its share of a run is the difference.
    The server is shared, so whatever else uses it meanwhile counts too."""
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def setup(settings: Settings, n_workers: int, policy: str) -> FakeWorkers:
    await ensure_topics(settings, fixed_topic_partitions(settings))
    workers = FakeWorkers(settings, n_workers)
    await workers.start(settings)
    if policy == "learned":
        await publish_trained_snapshot(settings)
    return workers


async def throughput_phase(n_workers: int, n_requests: int, policy: str, keep: bool,
                           profile: str | None = None) -> dict[str, Any]:
    settings = bench_settings(policy)
    topic = Topics(settings.kafka.topic_prefix).requests
    workers = await setup(settings, n_workers, policy)
    try:
        producer = make_producer(settings, client_id="bench-producer", linger_ms=5)
        await producer.start()
        try:
            t0 = time.perf_counter()
            await produce_all(producer, topic, make_requests(n_requests, seed=n_workers))
            print(f"  produced {n_requests} requests in {time.perf_counter() - t0:.1f} s")
        finally:
            await producer.stop()
        redis_cpu_before = await redis_cpu_s(workers.client)
        proc = DispatcherProcess(settings, profile)
        proc.start()
        await wait_committed(settings, topic, n_requests, timeout=600)
        redis_cpu = await redis_cpu_s(workers.client) - redis_cpu_before
        out = proc.finish()
    finally:
        await workers.stop()
        if not keep:
            await remove_namespace(settings)  # the run's unique topic/key prefix
    samples = out["samples"]
    routed = sum(n for n, _, _ in samples)
    span = max(e for _, _, e in samples) - min(s for _, s, _ in samples)
    cpu_ms = (out["cpu"][-1] - out["cpu"][0]) * 1e3 / (routed - samples[0][0])
    return {"workers": n_workers, "routed": routed, "seconds": span, "rate": routed / span, "cpu_ms": cpu_ms,
            "redis_cpu_ms": redis_cpu * 1e3 / routed, "mean_batch": routed / len(samples),
            "policies": out["policies"], "model_version": out["model_version"]}


async def overhead_phase(n_workers: int, rate: float, duration: float, policy: str, keep: bool) -> dict[str, Any]:
    settings = bench_settings(policy)
    topic = Topics(settings.kafka.topic_prefix).requests
    workers = await setup(settings, n_workers, policy)
    n = int(rate * duration)
    try:
        proc = DispatcherProcess(settings, watch_lag=True)
        proc.start()
        producer = make_producer(settings, client_id="bench-producer")
        await producer.start()
        try:
            warm = make_requests(50, seed=99)
            await produce_all(producer, topic, warm)  # the dispatcher joins its group and warms up
            await wait_committed(settings, topic, len(warm), timeout=120)
            swapper = asyncio.create_task(republish_snapshots(settings, every_s=1.0)) if policy == "learned" else None
            try:
                achieved = await produce_at_rate(producer, topic, make_requests(n, seed=7), rate)
            finally:
                if swapper is not None:
                    swapper.cancel()
        finally:
            await producer.stop()
        await wait_committed(settings, topic, n + len(warm), timeout=120)
        out = proc.finish()
    finally:
        await workers.stop()
        if not keep:
            await remove_namespace(settings)  # the run's unique topic/key prefix
    per_request: list[float] = []
    batch_sizes: list[int] = []
    routed_seen = 0
    for size, start, end in out["samples"]:
        routed_seen += size
        if routed_seen <= len(warm):
            continue  # warm-up batches
        per_request.extend([(end - start) * 1e3] * size)
        batch_sizes.append(size)
    per_request.sort()
    return {"workers": n_workers, "rate": achieved, "requests": len(per_request),
            "p50_ms": statistics.median(per_request), "p99_ms": per_request[int(0.99 * (len(per_request) - 1))],
            "mean_ms": statistics.fmean(per_request), "mean_batch": statistics.fmean(batch_sizes),
            "max_batch": max(batch_sizes), "policies": out["policies"], "swap_lag_ms": out["swap_lag_ms"],
            "lag_p99_ms": out["lag_p99_ms"]}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="8,64,256", help="worker counts for the throughput phase")
    parser.add_argument("--requests", type=int, default=15000, help="requests per throughput run")
    parser.add_argument("--rates", default="500", help="request rates of the overhead phase (comma-separated)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of the overhead phase")
    parser.add_argument("--overhead-workers", type=int, default=8)
    parser.add_argument("--policy", default="learned")
    parser.add_argument("--keep", action="store_true", help="keep the topics and Redis keys")
    parser.add_argument("--profile", metavar="DIR", help="cProfile the dispatcher in the throughput runs "
                        "(from its first batch on): DIR/dispatcher-<workers>.prof (read with pstats or snakeviz)")
    parser.add_argument("--min-model-share", type=float, default=0.9,
                        help="with the learned policy, fail unless the model made at least this share of decisions")
    args = parser.parse_args()

    print(f"dispatcher benchmark: policy {args.policy}, batch size {Settings().dispatcher.batch_size}")
    rows = []
    for n in (int(x) for x in args.workers.split(",")):
        print(f"throughput with {n} workers ...")
        profile = None
        if args.profile:
            Path(args.profile).mkdir(parents=True, exist_ok=True)
            profile = str(Path(args.profile) / f"dispatcher-{n}.prof")
        rows.append(await throughput_phase(n, args.requests, args.policy, args.keep, profile))
        print(f"  decisions: {check_split(rows[-1]['policies'], args.policy, args.min_model_share)}")
    overheads = []
    for rate in (float(x) for x in args.rates.split(",")):
        print(f"routing overhead at {rate:.0f} req/s with {args.overhead_workers} workers ...")
        overheads.append(await overhead_phase(args.overhead_workers, rate, args.duration, args.policy, args.keep))
        print(f"  decisions: {check_split(overheads[-1]['policies'], args.policy, args.min_model_share)}")

    print("\nthroughput (one dispatcher process, requests pre-produced)")
    print(f"{'workers':>8} {'routed':>8} {'seconds':>8} {'req/s':>8} {'CPU ms/req':>11} {'req/CPU-s':>10} "
          f"{'Redis ms/req':>13} {'mean batch':>11}  decisions (model / fallback)")
    for r in rows:
        print(f"{r['workers']:>8} {r['routed']:>8} {r['seconds']:>8.2f} {r['rate']:>8.0f} {r['cpu_ms']:>11.3f} "
              f"{1000 / r['cpu_ms']:>10.0f} {r['redis_cpu_ms']:>13.3f} {r['mean_batch']:>11.1f}  "
              f"{check_split(r['policies'], args.policy, 0)}")
    print(f"(host load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; "
          "CPU ms/req is the dispatcher process's own CPU time, steadier than wall time on a busy host; "
          "Redis ms/req the shared Redis server's CPU over the run per routed request)")
    print("\nrouting overhead per request, batch consumed -> every publish of the batch acknowledged")
    for over in overheads:
        print(f"  at {over['rate']:.0f} req/s ({over['workers']} workers, {over['requests']} requests): "
              f"p50 {over['p50_ms']:.2f} ms  p99 {over['p99_ms']:.2f} ms  mean {over['mean_ms']:.2f} ms  "
              f"batch mean {over['mean_batch']:.1f} max {over['max_batch']}; "
              f"{check_split(over['policies'], args.policy, 0)}")
        if over["swap_lag_ms"]:
            lags = over["swap_lag_ms"]
            print(f"    snapshot hot-swaps while routing: {len(lags)}, event-loop stall around a swap max "
                  f"{max(lags):.2f} ms (median {statistics.median(lags):.2f}); loop lateness p99 overall "
                  f"{over['lag_p99_ms']:.2f} ms")
    if args.policy == "learned":
        median, worst = swap_work_ms(bench_settings(args.policy))
        print(f"snapshot hot-swap's own synchronous work (verify + decode + load, {len(trained_snapshot().arrays)} "
              f"arrays): median {median:.3f} ms, max {worst:.3f} ms of 200")
    print(f"(host load average at the end: {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    asyncio.run(main())
