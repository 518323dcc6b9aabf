#!/usr/bin/env python3
"""A fault-injection run a user can repeat: the real stack under open-loop load while faults are injected on a
schedule, then one table row per fault (issue 13, item 5; docs/reliability.md has a full run's table).

    .venv/bin/python scripts/chaos.py                 # the full run: ~6 min, its own Kafka broker and Redis
    .venv/bin/python scripts/chaos.py --short         # ~1 min: the CI form (tests/integration/test_chaos.py)

The stack: its OWN Redis (and, in the full run, its own Kafka broker), started with `scripts/services` under a
private run directory on free ports (LODESTAR_SERVICES_RUN_DIR), so that the run can kill and restart them
without touching anybody else's; three emulators (`--fault-injection`), a worker each, two dispatchers and the
learner, as `lodestar` processes (app/stack.py). The short form uses the configured broker (isolated topics and
groups) and leaves out the broker restart.

Load: requests at `--rate` per second with exponential gaps (open loop: a slow answer does not slow the
sending), each resent until the broker acknowledges it (same request id: the workers' dedupe makes that safe).
A supervisor restarts any service process that exits (as systemd or Kubernetes would) and counts it.

Faults, one per phase of `--phase` seconds, in this order: none (baseline); SIGKILL of a dispatcher, of a
worker (restarted after the dead-worker timeout, so its backlog is taken over) and of the learner; Redis
stopped for `--redis-down` seconds and restarted empty; the broker restarted (full run); an engine answering
500s; an engine hanging (generations and load polls); hostile messages (tests/fuzz_messages.py: fields in and
out of their bounds, mutated documents, raw bytes) beside the load.

Per phase: requests sent, answered (exactly once, with an error), dead-lettered (DLQ with a reason), LOST
(sent, acknowledged by the broker, and neither answered nor dead-lettered by the end of the drain: must be
0), duplicate answers the client discarded, the longest wait from send to first answer, and the restarts
(scheduled kills) and crashes (unexpected exits) of each service. Exit status 1 if anything was lost or a
service crashed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # the project, and the fuzz strategies of its test suite

from app.local_stack import (  # noqa: E402
    EMULATORS,
    LEARNER_SPEC,
    LODESTAR_CMD,
    child_env,
    dispatcher_spec,
    free_ports,
    wait_dispatchers,
    wait_group,
    wait_workers,
    worker_spec,
)
from app.readiness import StackProbes  # noqa: E402
from app.stack import ProcessSpec, Stack  # noqa: E402
from lodestar.kafka_admin import ensure_topics  # noqa: E402
from lodestar.kafka_io import make_consumer, make_producer  # noqa: E402
from lodestar.limits import Limits  # noqa: E402
from lodestar.names import Topics  # noqa: E402
from lodestar.schemas import InferenceRequest, SamplingParams  # noqa: E402
from lodestar.settings import Settings  # noqa: E402

SERVICES = ROOT / "scripts" / "services"
WORDS = ("the", "stars", "router", "engine", "cache", "prefix", "token", "answer", "queue", "river", "light")


# ---- private services -------------------------------------------------------------------------------------

def _free_port_block(n: int, start: int) -> int:
    """A port p with p..p+n-1 all free on loopback."""
    port = start
    while True:
        ok = True
        for p in range(port, port + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return port
        port += n


class PrivateServices:
    """This run's own Redis (and Kafka broker), started by scripts/services under a private run directory."""

    def __init__(self, run_dir: Path, *, kafka: bool, shared_bootstrap: str):
        self.run_dir = run_dir
        self.own_kafka = kafka
        # below the ephemeral range, where no outgoing connection takes a port between the probe and the bind
        self.redis_port = _free_port_block(2, 27379)
        self.bootstrap = f"127.0.0.1:{_free_port_block(3, 28092)}" if kafka else shared_bootstrap
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LODESTAR_KAFKA__", "LODESTAR_REDIS__"))}
        env.update(LODESTAR_SERVICES_RUN_DIR=str(self.run_dir), LODESTAR_KAFKA__BOOTSTRAP_SERVERS=self.bootstrap,
                   LODESTAR_REDIS__URL=self.redis_url, LODESTAR_SECURE_ENV_DIR=str(self.run_dir / "secure"))
        return env

    def start(self, *which: str) -> None:
        which = which or (("kafka", "redis") if self.own_kafka else ("redis",))
        out = subprocess.run([str(SERVICES), "start", *which], env=self._env(), capture_output=True, text=True,
                             timeout=300, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"scripts/services start {' '.join(which)} failed:\n{out.stdout}\n{out.stderr}")

    def _pid(self, service: str) -> int | None:
        path = self.run_dir / service / f"{service}.pid"
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        return None

    def stop(self, service: str, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> None:
        """Stop this run's own `service` (by the pid in the private run dir; never anybody else's)."""
        if service == "kafka" and not self.own_kafka:
            raise RuntimeError("the short run uses the shared broker: it never stops it")
        pid = self._pid(service)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[-1].startswith("Z"):
                return
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    def stop_all(self) -> None:
        for service in ("redis", "kafka") if self.own_kafka else ("redis",):
            self.stop(service)


# ---- bookkeeping ------------------------------------------------------------------------------------------

@dataclass
class Phase:
    name: str
    start: float = 0.0
    end: float = 0.0
    note: str = ""


@dataclass
class Ledger:
    """What the client saw: each request's send time and phase, every answer and dead letter."""

    sent: dict[str, tuple[float, str]] = field(default_factory=dict)  # request id -> (sent at, phase)
    answers: dict[str, list[tuple[float, str]]] = field(default_factory=lambda: defaultdict(list))
    dead: dict[str, str] = field(default_factory=dict)  # request id (record key) -> reason
    poison_sent: dict[tuple[int, int], str] = field(default_factory=dict)  # (partition, offset) -> expected
    poison_ids: dict[str, list[tuple[int, int]]] = field(default_factory=lambda: defaultdict(list))  # id -> where
    poison_anonymous: set[tuple[int, int]] = field(default_factory=set)  # valid, without a request id
    poison_dead: set[tuple[int, int]] = field(default_factory=set)
    poison_reasons: Counter[str] = field(default_factory=Counter)
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (time, service, restart|crash)

    def settled(self) -> bool:
        """Every request sent is answered or dead-lettered, and so is every hostile message."""
        if not all(rid in self.answers or rid in self.dead for rid in self.sent):
            return False
        return all(w in self.poison_dead or w in self.poison_answered() for w in self.poison_sent)

    def poison_answered(self) -> set[tuple[int, int]]:
        """Hostile messages answered: by their request id; those without one (the dispatcher gives them a fresh
        id) as many as there are answers to ids nobody sent."""
        answered = {w for rid, wheres in self.poison_ids.items() if rid in self.answers for w in wheres}
        strangers = sum(1 for rid in self.answers if rid not in self.sent and rid not in self.poison_ids)
        return answered | set(sorted(self.poison_anonymous)[:strangers])


def service_of(process_name: str) -> str:
    return process_name.rsplit("-", 1)[0] if process_name.startswith(("worker-", "dispatcher-", "emulator-")) \
        else process_name


class Chaos:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.rng = random.Random(args.seed)
        self.run_dir = Path(tempfile.mkdtemp(prefix="lodestar-chaos-"))
        shared = os.environ.get("LODESTAR_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:19092")
        self.services = PrivateServices(self.run_dir / "services", kafka=not args.short, shared_bootstrap=shared)
        tag = uuid.uuid4().hex[:8]
        self.settings = Settings(
            kafka={"bootstrap_servers": self.services.bootstrap, "topic_prefix": f"chaos{tag}.",
                   "request_partitions": 4, "results_partitions": 2, "telemetry_partitions": 1},
            redis={"url": self.services.redis_url, "key_prefix": f"chaos{tag}:"},
            worker={"state_ttl_s": 3.0, "max_concurrency": 64},
            dispatcher={"consumer_group": f"chaos{tag}-dispatcher", "dead_worker_timeout_s": args.dead_worker_s},
            learner={"consumer_group": f"chaos{tag}-learner", "checkpoint_path": self.run_dir / "learner.json",
                     "snapshot_every_s": 5.0, "snapshot_every_events": 200},
            snapshot_signing={"key_id": f"chaos{tag}", "key": secrets.token_hex(32)},
        )
        self.topics = Topics(self.settings.kafka.topic_prefix)
        self.fuzz_reply = f"{self.topics.prefix}reply.fuzz"
        self.ledger = Ledger()
        self.phases: list[Phase] = []
        self.engines = {"w1": "H100", "w2": "A100", "w3": "L40S"}
        self.urls: dict[str, str] = {}
        self.stack: Stack | None = None
        self.scheduled: set[str] = set()  # processes stopped on purpose, restarted by the schedule
        self._n = 0
        self.t0 = time.monotonic()

    def log(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    # ---- the stack ----------------------------------------------------------------------------------------

    def extra_env(self) -> dict[str, str]:
        return {"LODESTAR_WORKER__BREAKER_COOLDOWN_S": "2", "LODESTAR_WORKER__GENERATION_TIMEOUT_S": "20",
                "LODESTAR_WORKER__REQUEST_TIMEOUT_S": "30", "LODESTAR_TELEMETRY__LOG_JSON": "false"}

    async def start_stack(self) -> None:
        self.log(f"starting private {'Kafka and ' if self.services.own_kafka else ''}Redis under {self.run_dir}")
        await asyncio.to_thread(self.services.start)
        await ensure_topics(self.settings, {self.fuzz_reply: 1})
        self.stack = stack = Stack(self.run_dir / "logs", env={**child_env(self.settings), **self.extra_env()})
        for (wid, gpu), port in zip(self.engines.items(), free_ports(3, 24000), strict=True):
            stack.start(ProcessSpec(f"emulator-{wid}", [
                *LODESTAR_CMD, "emulator", "--gpu", gpu, "--port", str(port), "--time-scale", "1",
                "--log-level", "warning", "--fault-injection"], group=EMULATORS))
            self.urls[wid] = f"http://127.0.0.1:{port}"
        async with StackProbes(self.settings) as probes:
            async def healthy() -> bool:
                return all(await asyncio.gather(*(probes.engine_healthy(u) for u in self.urls.values())))
            await stack.wait_ready(healthy, 120, "emulators")
            for wid, gpu in self.engines.items():
                stack.start(worker_spec(_Engine(wid, gpu), self.urls[wid]))
            stack.start(LEARNER_SPEC)
            for d in ("d1", "d2"):
                stack.start(dispatcher_spec(d, "least_request"))
            await wait_workers(stack, probes, list(self.engines), 120)
            await wait_group(stack, probes, self.settings.learner.consumer_group, ["learner"], 120)
            await wait_dispatchers(stack, probes, ["d1", "d2"], 120)
        self.log("stack ready: 3 emulators, 3 workers, 2 dispatchers, learner")

    async def supervise(self) -> None:
        """Restart any service process that exits on its own (counted as a crash)."""
        assert self.stack is not None
        while True:
            for proc in self.stack.processes:
                if proc.returncode() is not None and proc.name not in self.scheduled:
                    self.log(f"{proc.name} exited with {proc.returncode()} (a crash): restarting it;\n"
                             f"{proc.log_tail(15)}")
                    self.ledger.events.append((time.monotonic(), service_of(proc.name), "crash"))
                    proc.close_log()
                    self.stack.start(proc.spec)
            await asyncio.sleep(0.5)

    async def kill_and_restart(self, name: str, after_s: float) -> None:
        assert self.stack is not None
        self.scheduled.add(name)
        spec = self.stack[name].spec
        self.stack.kill(name)
        self.log(f"SIGKILL {name}; restart in {after_s:g} s")
        await asyncio.sleep(after_s)
        self.stack.start(spec)
        self.scheduled.discard(name)
        self.ledger.events.append((time.monotonic(), service_of(name), "restart"))

    async def set_fault(self, wid: str, mode: str, **extra: Any) -> None:
        async with httpx.AsyncClient(timeout=5) as http:
            (await http.post(f"{self.urls[wid]}/fault_injection", json={"mode": mode, **extra})).raise_for_status()

    # ---- load ---------------------------------------------------------------------------------------------

    async def send_loop(self, producer: Any, stop: asyncio.Event) -> None:
        pending: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            await asyncio.sleep(self.rng.expovariate(self.args.rate))
            self._n += 1
            rid = f"c{self._n:06d}"
            prompt = " ".join(self.rng.choice(WORDS) for _ in range(self.rng.randint(8, 60)))
            req = InferenceRequest(request_id=rid, prompt=prompt,
                                   sampling=SamplingParams(max_new_tokens=self.rng.randint(4, 24)))
            task = asyncio.create_task(self.send_until_acked(producer, rid, req.to_bytes()))
            pending.add(task)
            task.add_done_callback(pending.discard)
        await asyncio.gather(*pending)

    async def send_until_acked(self, producer: Any, rid: str, value: bytes) -> None:
        sent_at, phase = time.monotonic(), self.phases[-1].name
        while True:
            try:
                await (await producer.send(self.topics.requests, value, key=rid.encode()))
                break
            except Exception as exc:  # the broker is away: a client sends again (same id)
                self.log(f"send of {rid} failed ({type(exc).__name__}); resending")
                await asyncio.sleep(1.0)
        self.ledger.sent[rid] = (sent_at, phase)

    async def send_poison(self, producer: Any, n: int) -> None:
        from fuzz_messages import generate_requests

        limits = Limits(self.settings)
        with warnings.catch_warnings():  # hypothesis warns about its own strategies' use of `random`
            warnings.simplefilter("ignore")
            fuzzed = await asyncio.to_thread(generate_requests, self.topics.prefix, n, self.args.seed)
        for message in fuzzed:
            try:
                request = limits.decode_request(message.value)
                expected, rid = "answered", request.request_id
                if b'"request_id"' not in (message.value or b""):  # given a fresh id when decoded: unknown here
                    rid = ""
            except Exception:
                expected, rid = "dead_letter", None
            meta = await (await producer.send(self.topics.requests, message.value, key=message.key,
                                              headers=list(message.headers)))
            where = (meta.partition, meta.offset)
            self.ledger.poison_sent[where] = expected
            if rid == "":
                self.ledger.poison_anonymous.add(where)
            elif rid is not None:
                self.ledger.poison_ids[rid].append(where)
            await asyncio.sleep(self.args.phase / (2 * n))

    async def read_loop(self) -> None:
        consumer = make_consumer(self.settings, self.topics.results, self.topics.dlq, self.fuzz_reply,
                                 group_id=None, client_id="chaos-reader", metadata_max_age_ms=1000)
        await consumer.start()
        try:
            while True:
                batches = await consumer.getmany(timeout_ms=200)
                now = time.monotonic()
                for tp, records in batches.items():
                    for r in records:
                        self.observe(tp.topic, r, now)
        finally:
            await consumer.stop()

    def observe(self, topic: str, record: Any, now: float) -> None:
        try:
            doc = json.loads(record.value)
        except (TypeError, ValueError):
            return
        if topic == self.topics.dlq:
            where = (doc.get("partition"), doc.get("offset"))
            if doc.get("topic") == self.topics.requests and where in self.ledger.poison_sent:
                self.ledger.poison_dead.add(where)
                self.ledger.poison_reasons[f"{doc.get('service')}/{doc.get('stage')}"] += 1
            elif doc.get("key"):
                self.ledger.dead[doc["key"]] = str(doc.get("reason", ""))[:200]
            return
        rid = doc.get("request_id")
        if isinstance(rid, str):
            self.ledger.answers[rid].append((now, str(doc.get("status"))))

    # ---- the schedule -------------------------------------------------------------------------------------

    def schedule(self) -> list[tuple[str, Callable[[], Awaitable[None]], float]]:
        """(phase name, its fault, the phase's length)."""
        a = self.args

        async def nothing() -> None:
            return None

        async def kill(name: str, after_s: float) -> None:
            await self.kill_and_restart(name, after_s)

        async def redis_outage() -> None:
            await asyncio.to_thread(self.services.stop, "redis", signal.SIGKILL)
            self.log(f"Redis killed; restarting it empty in {a.redis_down:g} s")
            await asyncio.sleep(a.redis_down)
            shutil.rmtree(self.services.run_dir / "redis" / "data", ignore_errors=True)
            await asyncio.to_thread(self.services.start, "redis")
            self.log("Redis back (empty)")

        async def broker_restart() -> None:
            self.log("restarting the broker")
            await asyncio.to_thread(self.services.stop, "kafka", signal.SIGTERM)
            await asyncio.to_thread(self.services.start, "kafka")
            self.log("broker back")

        async def engine(mode: str, wid: str, **extra: Any) -> None:
            await self.set_fault(wid, mode, **extra)
            self.log(f"engine {wid}: {mode} {extra or ''}")
            await asyncio.sleep(a.phase * 0.6)
            await self.set_fault(wid, "none")
            self.log(f"engine {wid}: healthy again")

        async def poison() -> None:
            async with _producer(self.settings, "chaos-poison") as producer:
                await self.send_poison(producer, a.poison)

        worker_back = a.dead_worker_s + 4 if not a.short else 2.0
        plan: list[tuple[str, Callable[[], Awaitable[None]], float]] = []
        if not a.short:
            plan.append(("none (baseline)", nothing, a.phase))
        plan += [
            ("SIGKILL dispatcher d1", lambda: kill("dispatcher-d1", 2.0), a.phase),
            ("SIGKILL worker w2", lambda: kill("worker-w2", worker_back), max(a.phase, worker_back + 4)),
            ("SIGKILL learner", lambda: kill("learner", 2.0), a.phase),
            (f"Redis down {a.redis_down:g} s, back empty", redis_outage, max(a.phase, a.redis_down + 10)),
        ]
        if not a.short:
            plan.append(("broker restart", broker_restart, a.phase))
        plan += [
            ("engine w1 answers 500", lambda: engine("error", "w1", status=500), a.phase),
            ("engine w3 hangs", lambda: engine("hang", "w3", loads=True), max(a.phase, 12.0 if a.short else 20.0)),
            (f"{a.poison} hostile messages", poison, a.phase),
        ]
        return plan

    async def run(self) -> int:
        try:
            await self.start_stack()
            supervisor = asyncio.create_task(self.supervise())
            reader = asyncio.create_task(self.read_loop())
            stop = asyncio.Event()
            async with _producer(self.settings, "chaos-load") as producer:
                self.phases.append(Phase("(start)", time.monotonic()))
                sender = asyncio.create_task(self.send_loop(producer, stop))
                for name, fault, length in self.schedule():
                    phase = Phase(name, time.monotonic())
                    self.phases.append(phase)
                    self.log(f"phase: {name} ({length:g} s)")
                    injected = asyncio.create_task(fault())
                    await asyncio.sleep(length)
                    await injected
                    phase.end = time.monotonic()
                stop.set()
                await sender
            self.log(f"load stopped after {len(self.ledger.sent)} requests; draining up to {self.args.drain:g} s")
            deadline = time.monotonic() + self.args.drain
            while not self.ledger.settled() and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
            await asyncio.sleep(2.0)  # late duplicates
            supervisor.cancel()
            reader.cancel()
            return self.report()
        finally:
            if self.stack is not None:
                self.stack.stop_all()
            await asyncio.to_thread(self.services.stop_all)

    # ---- the table ----------------------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        ledger = self.ledger
        rows = []
        for phase in self.phases[1:]:
            ids = [rid for rid, (_, p) in ledger.sent.items() if p == phase.name]
            answered = [rid for rid in ids if rid in ledger.answers]
            once = [rid for rid in answered if len(ledger.answers[rid]) == 1]
            errors = [rid for rid in answered if ledger.answers[rid][0][1] != "ok"]
            dead = [rid for rid in ids if rid in ledger.dead and rid not in ledger.answers]
            lost = [rid for rid in ids if rid not in ledger.answers and rid not in ledger.dead]
            dups = sum(len(ledger.answers[rid]) - 1 for rid in answered)
            waits = [ledger.answers[rid][0][0] - ledger.sent[rid][0] for rid in answered]
            end = phase.end or time.monotonic()
            events = Counter(f"{svc} {kind}" for t, svc, kind in ledger.events if phase.start <= t < end + 1e-9)
            row = {"fault": phase.name, "sent": len(ids), "answered once": len(once), "with error": len(errors),
                   "DLQ": len(dead), "LOST": len(lost), "dups discarded": dups,
                   "longest wait s": round(max(waits, default=0.0), 1),
                   "restarts": ", ".join(f"{k} x{v}" for k, v in sorted(events.items())) or "-",
                   "lost ids": lost[:5]}
            if phase.name.endswith("hostile messages"):
                expected = Counter(ledger.poison_sent.values())
                answered_poison = ledger.poison_answered()
                settled = {w for w in ledger.poison_sent if w in ledger.poison_dead or w in answered_poison}
                row["poison"] = {"sent": len(ledger.poison_sent), "expected": dict(expected),
                                 "dead-lettered": len(ledger.poison_dead), "answered": len(answered_poison),
                                 "LOST": len(ledger.poison_sent) - len(settled),
                                 "lost": [f"{w} {ledger.poison_sent[w]}" for w in ledger.poison_sent
                                          if w not in settled][:10],
                                 "DLQ reasons": dict(ledger.poison_reasons.most_common(6))}
            rows.append(row)
        return rows

    def report(self) -> int:
        rows = self.rows()
        cols = ["fault", "sent", "answered once", "with error", "DLQ", "LOST", "dups discarded", "longest wait s",
                "restarts"]
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
        print()
        print("| " + " | ".join(c.ljust(widths[c]) for c in cols) + " |")
        print("|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|")
        for r in rows:
            print("| " + " | ".join(str(r[c]).ljust(widths[c]) for c in cols) + " |")
        crashes = [e for e in self.ledger.events if e[2] == "crash"]
        lost = sum(r["LOST"] for r in rows) + sum(r.get("poison", {}).get("LOST", 0) for r in rows)
        for r in rows:
            if "poison" in r:
                print(f"\nhostile messages: {json.dumps(r['poison'])}")
            if r["lost ids"]:
                print(f"lost in '{r['fault']}': {r['lost ids']}")
        print(f"\nservice crashes (unexpected exits): {len(crashes)}; lost: {lost}; "
              f"load: {Path('/proc/loadavg').read_text().strip()}; logs: {self.run_dir / 'logs'}")
        if self.args.json:
            Path(self.args.json).write_text(json.dumps({"rows": rows, "crashes": len(crashes), "lost": lost},
                                                       indent=1, default=str))
        return 1 if lost or crashes else 0


@dataclass(frozen=True)
class _Engine:
    worker_id: str
    gpu: str
    model: str = "llama-3.1-8b"


@contextlib.asynccontextmanager
async def _producer(settings: Settings, client_id: str):  # noqa: ANN202
    producer = make_producer(settings, client_id=client_id, request_timeout_ms=10_000)
    await producer.start()
    try:
        yield producer
    finally:
        await producer.stop()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--short", action="store_true", help="the CI form: short phases, the shared broker, no restart")
    p.add_argument("--phase", type=float, help="seconds per fault (default 30, short 5)")
    p.add_argument("--rate", type=float, help="requests per second (default 6, short 5)")
    p.add_argument("--redis-down", type=float, help="seconds Redis stays down (default 30, short 4)")
    p.add_argument("--poison", type=int, help="hostile messages (default 300, short 100)")
    p.add_argument("--dead-worker-s", type=float, help="dispatcher.dead_worker_timeout_s (default 8, short 4)")
    p.add_argument("--drain", type=float, help="max wait for the last answers, s (default 90; ends once all settle)")
    p.add_argument("--seed", type=int, default=13)
    p.add_argument("--json", help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    defaults = dict(phase=5.0, rate=5.0, redis_down=4.0, poison=100, dead_worker_s=4.0, drain=90.0) if args.short \
        else dict(phase=30.0, rate=6.0, redis_down=30.0, poison=300, dead_worker_s=8.0, drain=90.0)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(Chaos(parse_args(argv)).run())


if __name__ == "__main__":
    sys.exit(main())
