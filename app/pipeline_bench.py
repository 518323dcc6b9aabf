"""`lodestar bench pipeline`: the whole data path under open-loop Poisson load, and what it adds to TTFT.

Brings up the stack of `lodestar up` (app.local_stack) under a fresh namespace on the broker and Redis
of the environment: one emulator and one worker per engine of the cluster file, the learner and 1-2
`learned` dispatchers. A warm-up through every rate lets the learner publish a model; then, per rate,
`--seconds` of Poisson arrivals go through the client library (app.traffic: each request is sent at its
time whatever came back, i.e. open loop) and the telemetry topic is read alongside.

Per request, with every clock on this host (epoch ms):

    overhead = result received - request sent (created_at) - the worker's e2e_ms (the engine call)

split by the hops the messages' own timestamps bound: client -> decided (produce, broker, dispatcher
consume and routing up to `decision.decided_at`), decided -> engine call (dispatcher publish, broker,
worker consume and admission: the telemetry's `sent_at`), the engine (`e2e_ms`), engine done -> result
written (`result.completed_at`), result written -> received by the client. Per rate also the routed
requests per second (decisions over the span of their `decided_at`), each service's CPU time per request
(utime + stime from /proc/<pid>/stat over the rate's window) and the model-vs-fallback split. Writes
results.json and overhead_vs_rate.png; fails (exit 1) unless every request got exactly one result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

from app.demo import TOKEN_HIGH, TOKEN_LOW, namespaced
from app.local_services import LocalServices
from app.local_stack import DISPATCHERS, EMULATORS, LEARNER, WORKERS, child_env, start_pipeline
from app.namespace import remove_namespace
from app.readiness import StackProbes
from app.stack import Stack
from app.traffic import PhaseTally, TelemetryWatch, TimedRequest
from lodestar.client import LodestarClient
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.schemas import InferenceRequest, SamplingParams, now_ms
from lodestar.settings import load_settings

if TYPE_CHECKING:
    from sim.cluster import WorkerSpec

HOPS = ("client_to_decided", "decided_to_engine", "engine", "engine_to_result", "result_to_client")
SERVICE_GROUPS = (DISPATCHERS, WORKERS, LEARNER, EMULATORS)
TELEMETRY_GRACE_S = 3.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class PipelineOptions:
    cluster: Path
    rates: Sequence[float]
    seconds: float
    dispatchers: int
    warmup_s: float
    prompt_tokens: int
    max_new_tokens: int
    time_scale: float
    seed: int
    request_timeout_s: float
    startup_timeout_s: float
    out: Path


def poisson_stream(rate: float, seconds: float, prompt_tokens: int, max_new_tokens: int, seed: int,
                   id_prefix: str) -> list[TimedRequest]:
    """Open-loop arrivals: exponential gaps at `rate` per second for `seconds`; short token prompts, a quarter
    of them sharing one of 8 system prefixes (half the prompt), so the prefix index has something to match."""
    rng = np.random.default_rng(seed)
    shared = [rng.integers(TOKEN_LOW, TOKEN_HIGH, prompt_tokens // 2).tolist() for _ in range(8)]
    out: list[TimedRequest] = []
    t = float(rng.exponential(1.0 / rate))
    while t < seconds:
        if rng.random() < 0.25:
            ids = shared[int(rng.integers(8))] + rng.integers(TOKEN_LOW, TOKEN_HIGH,
                                                               prompt_tokens - prompt_tokens // 2).tolist()
        else:
            ids = rng.integers(TOKEN_LOW, TOKEN_HIGH, prompt_tokens).tolist()
        request = InferenceRequest(request_id=f"{id_prefix}-{len(out)}", input_ids=ids,
                                   sampling=SamplingParams(max_new_tokens=max_new_tokens))
        out.append(TimedRequest(t, request))
        t += float(rng.exponential(1.0 / rate))
    return out


def warmup_stream(opts: PipelineOptions, id_prefix: str) -> list[TimedRequest]:
    """Every rate in turn for an equal share of `warmup_s`: the learner sees the queues each rate builds, so
    its model's training range covers them (beyond it the learned policy falls back to its heuristic)."""
    share = opts.warmup_s / len(opts.rates)
    out: list[TimedRequest] = []
    for k, rate in enumerate(opts.rates):
        part = poisson_stream(rate, share, opts.prompt_tokens, opts.max_new_tokens, opts.seed + 100 + k,
                              f"{id_prefix}{k}")
        out += [TimedRequest(t.at_s + k * share, t.request) for t in part]
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (seconds), 0 once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # fields 14 and 15 of proc(5), after the name


def cpu_by_group(stack: Stack) -> dict[str, float]:
    totals: dict[str, float] = dict.fromkeys(SERVICE_GROUPS, 0.0)
    for proc in stack.processes:
        totals[proc.spec.group] = totals.get(proc.spec.group, 0.0) + cpu_seconds(proc.pid)
    return totals


@dataclass(slots=True)
class Timed:
    """Client-side times of one request (epoch ms)."""

    sent_ms: float
    received_ms: float | None = None


async def drive_open_loop(client: LodestarClient, stream: Sequence[TimedRequest], tally: PhaseTally,
                          times: dict[str, Timed], timeout_s: float) -> None:
    """Send each request at its time (never waiting for earlier answers) and note when its result came."""
    start = time.monotonic()

    async def one(request: InferenceRequest) -> None:
        try:
            result = await client.request(request, timeout_s=timeout_s)
        except TimeoutError:
            tally.unanswered.append(request.request_id)
            return
        times[request.request_id].received_ms = now_ms()
        tally.add_result(result)

    tasks = []
    for timed in stream:
        delay = start + timed.at_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        request = timed.request.model_copy(update={"created_at": now_ms()})
        times[request.request_id] = Timed(request.created_at)
        tally.sent.append(request.request_id)
        tasks.append(asyncio.create_task(one(request)))
    await asyncio.gather(*tasks)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = (float(v) for v in np.percentile(np.asarray(values, dtype=float), [50, 90, 99]))
    return {"p50": p50, "p90": p90, "p99": p99}


def summarize_rate(rate: float, tally: PhaseTally, times: dict[str, Timed], cpu: dict[str, float],
                   wall_s: float, duplicates: int) -> dict[str, Any]:
    """One row of the report (see the module doc for each quantity)."""
    overhead: list[float] = []
    hops: dict[str, list[float]] = {h: [] for h in HOPS}
    for rid, result in tally.results.items():
        t = times[rid]
        event = tally.decisions.get(rid)
        if result.status != "ok" or result.e2e_ms is None or t.received_ms is None:
            continue
        overhead.append(t.received_ms - t.sent_ms - result.e2e_ms)
        if event is None:
            continue
        engine_done = event.sent_at + result.e2e_ms
        hops["client_to_decided"].append(event.decision.decided_at - t.sent_ms)
        hops["decided_to_engine"].append(event.sent_at - event.decision.decided_at)
        hops["engine"].append(result.e2e_ms)
        hops["engine_to_result"].append(result.completed_at - engine_done)
        hops["result_to_client"].append(t.received_ms - result.completed_at)
    decided = [e.decision.decided_at for e in tally.decisions.values()]
    span_s = (max(decided) - min(decided)) / 1000.0 if len(decided) > 1 else 0.0
    answered = len(tally.results)
    policies = Counter(e.decision.policy for e in tally.decisions.values())
    model = policies.get("learned", 0)
    return {
        "target_rate": rate,
        "sent": len(tally.sent),
        "answered": answered,
        "unanswered": len(tally.unanswered),
        "not_ok": sum(r.status != "ok" for r in tally.results.values()),
        "duplicates": duplicates,
        "offered_rate": len(tally.sent) / wall_s if wall_s else 0.0,
        "routed_per_s": (len(decided) - 1) / span_s if span_s else 0.0,
        "overhead_ms": percentiles(overhead),
        "hops_ms": {h: percentiles(v) for h, v in hops.items()},
        "cpu_ms_per_request": {g: 1000.0 * s / answered if answered else None for g, s in cpu.items()},
        "decisions": dict(policies),
        "model_share": model / sum(policies.values()) if policies else 0.0,
        "load_avg": os.getloadavg(),
    }


def print_rows(console: Console, rows: Sequence[dict[str, Any]]) -> None:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    table = Table(title="client-visible overhead (ms; result received - sent - engine e2e)", box=None)
    for col in ("rate", "routed/s", "p50", "p90", "p99", *(f"{h} p50/p99" for h in HOPS), "model", "load"):
        table.add_column(col, justify="right")
    for r in rows:
        o = r["overhead_ms"]
        table.add_row(f"{r['offered_rate']:.0f}", f"{r['routed_per_s']:.0f}", ms(o["p50"]), ms(o["p90"]), ms(o["p99"]),
                      *(f"{ms(r['hops_ms'][h]['p50'])}/{ms(r['hops_ms'][h]['p99'])}" for h in HOPS),
                      f"{r['model_share']:.0%}", f"{r['load_avg'][0]:.1f}")
    console.print(table)
    cpu = Table(title="CPU ms per request, by service (all its processes)", box=None)
    for col in ("rate", *SERVICE_GROUPS, "answered", "exactly once"):
        cpu.add_column(col, justify="right")
    for r in rows:
        ok = r["answered"] == r["sent"] and not r["unanswered"] and not r["duplicates"]
        cpu.add_row(f"{r['offered_rate']:.0f}", *(ms(r["cpu_ms_per_request"][g]) for g in SERVICE_GROUPS),
                    f"{r['answered']}/{r['sent']}", "yes" if ok else "NO")
    console.print(cpu)


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [r["offered_rate"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for q, style in (("p50", "o-"), ("p90", "s--"), ("p99", "^:")):
        ax.plot(rates, [r["overhead_ms"][q] or np.nan for r in rows], style, label=f"overhead {q}")
    ax.set_xlabel("offered load (req/s, Poisson)")
    ax.set_ylabel("client-visible overhead (ms, log scale)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


async def _run(console: Console, opts: PipelineOptions, engines: Sequence[WorkerSpec], stack: Stack,
               settings: Any, namespace: str) -> list[dict[str, Any]]:
    await ensure_topics(settings, fixed_topic_partitions(settings))
    dispatcher_ids = [f"bench-{i + 1}" for i in range(opts.dispatchers)]
    rows: list[dict[str, Any]] = []
    async with StackProbes(settings) as probes:
        await start_pipeline(stack, probes, engines, dispatcher_ids, "learned", time_scale=opts.time_scale,
                             timeout_s=opts.startup_timeout_s, echo=console.print)
        async with LodestarClient(settings) as client:
            watch = TelemetryWatch(settings)
            await watch.start()
            try:
                warm = PhaseTally("warm-up")
                stream = warmup_stream(opts, f"{namespace}-warm")
                watch.follow((t.request.request_id for t in stream), warm)
                await drive_open_loop(client, stream, warm, {}, opts.request_timeout_s)
                snap = await probes.snapshot()
                console.print(f"warm-up: {len(warm.results)}/{len(warm.sent)} answered; model snapshot "
                              f"{f'v{snap.version}' if snap else 'none yet'}")
                await asyncio.sleep(2.0)  # the dispatchers' snapshot watch picks up the last announcement
                for k, rate in enumerate(opts.rates):
                    tally = PhaseTally(f"{rate:g}/s")
                    times: dict[str, Timed] = {}
                    stream = poisson_stream(rate, opts.seconds, opts.prompt_tokens, opts.max_new_tokens,
                                            opts.seed + 1 + k, f"{namespace}-r{k}")
                    watch.follow((t.request.request_id for t in stream), tally)
                    dup0 = client.duplicate_results
                    cpu0, t0 = cpu_by_group(stack), time.monotonic()
                    await drive_open_loop(client, stream, tally, times, opts.request_timeout_s)
                    wall, cpu1 = time.monotonic() - t0, cpu_by_group(stack)
                    await asyncio.sleep(TELEMETRY_GRACE_S)  # the last telemetry events and any duplicate result
                    stack.check()
                    row = summarize_rate(rate, tally, times, {g: cpu1[g] - cpu0.get(g, 0.0) for g in cpu1},
                                         wall, client.duplicate_results - dup0)
                    rows.append(row)
                    o = row["overhead_ms"]
                    console.print(f"rate {rate:g}/s: {row['answered']}/{row['sent']} answered, overhead p50 "
                                  f"{o['p50'] or 0:.1f} p99 {o['p99'] or 0:.1f} ms, model "
                                  f"{row['model_share']:.0%}, load {row['load_avg'][0]:.1f}")
            finally:
                await watch.stop()
    return rows


def run_pipeline_bench(opts: PipelineOptions) -> int:
    """Run the bench (module doc); 0 if every request got exactly one result, else 1."""
    from sim.cluster import read_cluster

    console = Console() if Console().is_terminal else Console(width=220)
    engines = read_cluster(opts.cluster).expand()
    namespace = f"pb{uuid.uuid4().hex[:6]}"
    log_dir = opts.out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    settings = namespaced(load_settings(), namespace, log_dir)
    console.print(f"[bold]bench pipeline[/]: {len(engines)} engines ({opts.cluster.name}), {opts.dispatchers} "
                  f"learned dispatcher(s), rates {', '.join(f'{r:g}' for r in opts.rates)} req/s x {opts.seconds:g} s, "
                  f"namespace {namespace}, host load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    services = LocalServices(settings, echo=lambda line: console.print(line, markup=False, highlight=False))
    stack = Stack(log_dir, env=child_env(settings))
    rows: list[dict[str, Any]] = []
    try:
        services.ensure_running()
        rows = asyncio.run(_run(console, opts, engines, stack, settings, namespace))
    finally:
        stack.stop_all()
        with contextlib.suppress(Exception):
            asyncio.run(remove_namespace(settings))
        services.stop_started()
    print_rows(console, rows)
    opts.out.mkdir(parents=True, exist_ok=True)
    meta = {"cluster": str(opts.cluster), "dispatchers": opts.dispatchers, "seconds": opts.seconds,
            "prompt_tokens": opts.prompt_tokens, "max_new_tokens": opts.max_new_tokens,
            "time_scale": opts.time_scale, "cpus": os.cpu_count()}
    (opts.out / "results.json").write_text(json.dumps({"meta": meta, "rates": rows}, indent=2))
    plot(rows, opts.out / "overhead_vs_rate.png",
         f"{len(engines)} engines, {opts.dispatchers} dispatcher(s), learned")
    console.print(f"wrote {opts.out / 'results.json'} and {opts.out / 'overhead_vs_rate.png'}")
    lost = [r for r in rows if r["answered"] != r["sent"] or r["unanswered"] or r["duplicates"]]
    if lost or len(rows) != len(opts.rates):
        console.print("[red]not every request was answered exactly once[/]")
        return 1
    console.print("every request answered exactly once")
    return 0
