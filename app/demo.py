"""The demo behind `lodestar up`: the whole pipeline on this machine, and a heuristic-versus-learned run
through it.

Starts Kafka and Redis if they do not answer (scripts/services; stopped again at the end only if
started here), creates the topics, then runs as subprocesses (app.stack, logs in `.run/up/`):
one emulator per engine of the cluster file, a worker in front of each, the learner and two
dispatchers. Everything runs under a fresh topic and key prefix (`up<hex>.` / `up<hex>:`), removed at
the end, so a run starts cold and leaves nothing behind.

Then two phases of the workload, each `--phase-seconds` of arrivals at `--rate`, sent through the
client library: phase 1 with the dispatchers on a heuristic policy while the learner learns from its
telemetry; phase 2 with the dispatchers restarted on the `learned` policy. Each phase draws its own
stream (seed, seed + 1) of the same workload, so both start with cold caches. The run ends with TTFT
and load-share tables and the count check: every request must get exactly one result.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.live import Live

from app.local_services import LocalServices, ServicesError
from app.local_stack import child_env, restart_dispatchers, start_pipeline
from app.namespace import remove_namespace
from app.readiness import StackProbes
from app.stack import Stack, StackError
from app.traffic import PhaseTally, TelemetryWatch, TimedRequest, drive
from app.traffic_view import (
    decisions_line,
    describe_snapshot,
    load_share_table,
    progress_lines,
    progress_panel,
    ttft_table,
)
from lodestar.client import LodestarClient
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.names import Topics
from lodestar.schemas import InferenceRequest, SamplingParams
from lodestar.settings import Settings, SnapshotSigningSettings, load_settings
from lodestar.snapshot import Snapshot, SnapshotError

if TYPE_CHECKING:
    from sim.cluster import WorkerSpec
    from sim.workloads import Workload, WorkloadRequest

TOKEN_LOW, TOKEN_HIGH = 1000, 100_000  # ids drawn for synthetic prompts (inside every model's vocabulary)
LEARNER_SNAPSHOT_EVERY_EVENTS = 50
LEARNER_SNAPSHOT_EVERY_S = 5.0
LEARNER_CATCH_UP_S = 20.0
NON_TTY_PROGRESS_EVERY_S = 10.0


@dataclass(frozen=True)
class Phase:
    """One phase of the run: the dispatchers' policy and the requests sent."""

    label: str
    policy: str
    seconds: float
    stream: list[TimedRequest]


def run_demo(
    cluster: Path,
    workload: Path,
    *,
    phase_seconds: float,
    rate: float | None,
    time_scale: float,
    heuristic: str,
    seed: int,
    startup_timeout: float,
    request_timeout: float,
    log_dir: Path,
) -> int:
    """Run the demo (see the module doc); returns the exit status: 0 if every request got exactly one result,
    1 if not or if the stack failed, 130 if interrupted."""
    from sim.cluster import read_cluster
    from sim.workloads import load_workload

    started = time.monotonic()
    console = Console() if Console().is_terminal else Console(width=int(os.environ.get("COLUMNS", 120)))
    engines = read_cluster(cluster).expand()
    ignored = sorted({k for e in engines for k in e.engine})
    if ignored:
        console.print(f"note: engine overrides {ignored} of {cluster} apply to the simulator only")
    work = load_workload(workload).with_rate(rate)
    namespace = f"up{uuid.uuid4().hex[:6]}"
    settings = namespaced(load_settings(), namespace, log_dir)
    phases = [
        Phase(f"heuristic ({heuristic})", heuristic, phase_seconds,
              request_stream(work, seed, phase_seconds, f"{namespace}-a")),
        Phase("learned", "learned", phase_seconds, request_stream(work, seed + 1, phase_seconds, f"{namespace}-b")),
    ]
    sizes = " + ".join(str(len(p.stream)) for p in phases)
    console.print(f"[bold]lodestar up[/]: {len(engines)} engines from {cluster.name}, workload {work.name} at "
                  f"{_rate_text(work)}, 2 phases x {phase_seconds:g} s ({sizes} requests), time scale "
                  f"{time_scale:g}, namespace {namespace}, logs in {log_dir}")

    log_dir.mkdir(parents=True, exist_ok=True)
    for old in [*log_dir.glob("*.log"), settings.learner.checkpoint_path]:
        old.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM stops everything as Ctrl-C does
    services = LocalServices(settings, echo=lambda line: console.print(line, markup=False, highlight=False))
    stack = Stack(log_dir, env=child_env(settings))
    code = 1
    try:
        services.ensure_running()
        answered = asyncio.run(_run(console, stack, settings, engines, phases, time_scale, request_timeout,
                                    startup_timeout))
        code = 0 if answered else 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: stopping everything[/]")
        code = 130
    except (StackError, ServicesError) as exc:
        console.print(f"[red]failed:[/] {exc}", markup=True, highlight=False)
    finally:
        t0 = time.monotonic()
        stack.stop_all()
        with contextlib.suppress(Exception):
            asyncio.run(remove_namespace(settings))
        console.print(f"all {len(stack.processes)} processes of the run stopped ({time.monotonic() - t0:.1f} s); "
                      f"namespace {namespace} removed")
        services.stop_started()
        console.print(f"lodestar up: {time.monotonic() - started:.0f} s in all")
    return code


def namespaced(settings: Settings, namespace: str, log_dir: Path) -> Settings:
    """The settings under a private topic and key prefix, consumer groups and learner checkpoint, and, unless
    one is configured, a snapshot signing key of the run's own (random: nothing outlives the run)."""
    signing = settings.snapshot_signing
    if not signing.key.get_secret_value():
        signing = SnapshotSigningSettings(key_id=namespace, key=secrets.token_hex(32))
    return settings.model_copy(update={
        "snapshot_signing": signing,
        "kafka": settings.kafka.model_copy(update={"topic_prefix": f"{namespace}."}),
        "redis": settings.redis.model_copy(update={"key_prefix": f"{namespace}:"}),
        "dispatcher": settings.dispatcher.model_copy(update={"consumer_group": f"{namespace}-dispatchers"}),
        "learner": settings.learner.model_copy(update={
            "consumer_group": f"{namespace}-learner",
            "checkpoint_path": log_dir / "learner-checkpoint.json",
            "snapshot_every_events": LEARNER_SNAPSHOT_EVERY_EVENTS,
            "snapshot_every_s": LEARNER_SNAPSHOT_EVERY_S,
        }),
    })


def prompt_tokens(req: WorkloadRequest, salt: str) -> list[int]:
    """Token ids for a workload request: each prefix block's tokens drawn from its chained hash (equal
    chains, equal tokens: shared prefixes stay shared), the partial last block from the request's own id."""
    out: list[int] = []
    for block_hash in req.block_hashes:
        out.extend(np.random.default_rng(block_hash).integers(TOKEN_LOW, TOKEN_HIGH, req.block_tokens).tolist())
    tail = req.prompt_len - len(out)
    if tail > 0:
        rng = np.random.default_rng(list(f"{salt}/{req.rid}".encode()))
        out.extend(rng.integers(TOKEN_LOW, TOKEN_HIGH, tail).tolist())
    return out[: req.prompt_len]


def request_stream(work: Workload, seed: int, seconds: float, id_prefix: str) -> list[TimedRequest]:
    """The workload's first `seconds` of arrivals as client requests; prompts and timing depend only on
    `seed`, request ids start with `id_prefix`."""
    out = []
    for req in _until(work.requests(seed), seconds):
        request = InferenceRequest(
            request_id=f"{id_prefix}-{req.rid}",
            input_ids=prompt_tokens(req, f"seed-{seed}"),
            sampling=SamplingParams(max_new_tokens=req.max_new_tokens),
            session_id=None if req.session_id is None else f"{id_prefix}-{req.session_id}",
        )
        out.append(TimedRequest(req.arrival_s, request))
    return out


def _rate_text(work: Workload) -> str:
    spec: Any = work.spec
    if spec.kind == "multi_turn":
        return f"{spec.session_rate:g} sessions/s"
    return "the trace's timing" if spec.rate is None else f"{spec.rate:g} req/s"


def _until(requests: Iterator[WorkloadRequest], seconds: float) -> Iterator[WorkloadRequest]:
    for req in requests:
        if req.arrival_s >= seconds:
            return
        yield req


async def _run(console: Console, stack: Stack, settings: Settings, engines: Sequence[WorkerSpec],
               phases: Sequence[Phase], time_scale: float, request_timeout: float, startup_timeout: float) -> bool:
    """Bring the stack up, run the phases, print the report; True if every request got exactly one result."""
    await ensure_topics(settings, fixed_topic_partitions(settings))
    async with StackProbes(settings) as probes:
        urls = await start_pipeline(stack, probes, engines, _dispatcher_ids(phases[0].policy), phases[0].policy,
                                    time_scale=time_scale, timeout_s=startup_timeout, echo=console.print)
        tallies: list[PhaseTally] = []
        async with LodestarClient(settings) as client:
            watch = TelemetryWatch(settings)
            await watch.start()
            try:
                for i, phase in enumerate(phases):
                    if i > 0:
                        t0 = time.monotonic()
                        ids = _dispatcher_ids(phase.policy)
                        await restart_dispatchers(stack, probes, ids, phase.policy, startup_timeout)
                        console.print(f"dispatchers restarted as {', '.join(ids)} in {time.monotonic() - t0:.1f} s")
                    tally = PhaseTally(phase.label, {e.worker_id: e.gpu for e in engines})
                    watch.follow((t.request.request_id for t in phase.stream), tally)
                    tallies.append(tally)
                    label = f"phase {i + 1}/{len(phases)} · {phase.label}"
                    await _run_phase(console, stack, probes, client, phase, tally, label, request_timeout)
                    console.print(f"{label}: done, {tally.completed} results, {tally.errors} errors")
                    if i + 1 < len(phases):
                        await _wait_learner(console, stack, probes, settings)
                await asyncio.sleep(1.0)  # the last telemetry events, for the decisions summary
            finally:
                await watch.stop()
            duplicates = client.duplicate_results
        _report(console, tallies, engines, time_scale)
        await _report_lag(console, probes, urls)
        return _count_check(console, tallies, duplicates)


def _dispatcher_ids(policy: str) -> list[str]:
    return [f"{policy}-1", f"{policy}-2"]


async def _current_snapshot(probes: StackProbes) -> Snapshot | None:
    with contextlib.suppress(SnapshotError):
        return await probes.snapshot()
    return None


async def _run_phase(console: Console, stack: Stack, probes: StackProbes, client: LodestarClient, phase: Phase,
                     tally: PhaseTally, label: str, request_timeout: float) -> None:
    """Drive the phase's stream while watching the stack and showing progress."""
    phase_s = phase.seconds
    snapshot: list[Snapshot | None] = [await _current_snapshot(probes)]
    sending = asyncio.create_task(drive(client, phase.stream, tally, request_timeout))

    async def watchdog() -> None:
        last_print = time.monotonic()
        while not sending.done():
            stack.check()
            snapshot[0] = await _current_snapshot(probes)
            if not console.is_terminal and time.monotonic() - last_print >= NON_TTY_PROGRESS_EVERY_S:
                console.print(" | ".join(progress_lines(tally, label, phase_s, snapshot[0])), highlight=False)
                last_print = time.monotonic()
            await asyncio.sleep(1.0)

    watching = asyncio.create_task(watchdog())
    live = Live(get_renderable=lambda: progress_panel(tally, label, phase_s, snapshot[0]), console=console,
                refresh_per_second=2, transient=False) if console.is_terminal else contextlib.nullcontext()
    try:
        with live:
            done, _ = await asyncio.wait({sending, watching}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # a dead process (StackError) ends the run here
    finally:
        for task in (sending, watching):
            task.cancel()
        await asyncio.gather(sending, watching, return_exceptions=True)


async def _wait_learner(console: Console, stack: Stack, probes: StackProbes, settings: Settings) -> None:
    """Wait (bounded) until the learner has learned and committed all telemetry so far, i.e. published the
    snapshot it would publish for it (a batch-trained model publishes only when it retrains)."""
    topic = Topics(settings.kafka.topic_prefix).telemetry

    async def caught_up() -> bool:
        return await probes.group_lag(settings.learner.consumer_group, topic) == 0

    t0 = time.monotonic()
    try:
        await stack.wait_ready(caught_up, LEARNER_CATCH_UP_S, "learner", poll_s=0.5)
        waited = f"caught up {time.monotonic() - t0:.1f} s after the phase"
    except StackError:
        stack.check()  # a dead process ends the run; a slow learner only delays its snapshot
        waited = f"still learning {LEARNER_CATCH_UP_S:g} s after the phase"
    console.print(f"learner {waited}: snapshot {describe_snapshot(await _current_snapshot(probes))}")


def _report(console: Console, tallies: Sequence[PhaseTally], engines: Sequence[WorkerSpec], time_scale: float) -> None:
    console.print()
    console.print(ttft_table([(t.name, t.ttft()) for t in tallies],
                             f"TTFT, ms of wall-clock time (time scale {time_scale:g}: emulated GPU time is wall "
                             f"/ {time_scale:g})"))
    workers_by_gpu: dict[str, list[str]] = {}
    for e in engines:
        workers_by_gpu.setdefault(e.gpu, []).append(e.worker_id)
    console.print(load_share_table([(t.name, t) for t in tallies], workers_by_gpu))
    for t in tallies:
        console.print(decisions_line(t), highlight=False)


async def _report_lag(console: Console, probes: StackProbes, urls: dict[str, str]) -> None:
    """How far behind its modelled timeline each emulator's clock fell (the host's slack, or lack of it)."""
    lags = []
    for worker_id, url in urls.items():
        with contextlib.suppress(Exception):
            info = (await probes.engine_info(url)).get("emulator", {})
            lags.append(f"{worker_id} {info['max_lag_s'] * 1000:.0f} ms")
    if lags:
        console.print(f"emulator clock lag, worst step (emulated time): {', '.join(lags)}", highlight=False)


def _count_check(console: Console, tallies: Sequence[PhaseTally], duplicates: int) -> bool:
    sent = sum(len(t.sent) for t in tallies)
    answered = sum(t.completed for t in tallies)
    missing = sum(len(t.unanswered) for t in tallies)
    ok = sum(r.status == "ok" for t in tallies for r in t.results.values())
    good = answered == sent and missing == 0
    style = "green" if good else "red"
    console.print(f"[{style}]count check: {sent} requests sent, {answered} answered exactly once "
                  f"({ok} ok, {answered - ok} not ok), {missing} without a result; {duplicates} duplicate "
                  f"deliveries discarded by the client[/]")
    return good
