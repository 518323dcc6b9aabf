"""`lodestar bench gateway`: what the gateway and the pipeline behind it add to a streamed request's latency.

One emulator (H100, real time by default), its worker, a dispatcher and a gateway run as local processes under
a private topic and key prefix (removed at the end). The same open-loop Poisson stream of chat requests (each
its own prompt, `--max-tokens` tokens, ignore_eos, streamed) is sent twice per round: straight to the
emulator's `/v1/chat/completions`, and through the gateway, the emulator's cache flushed before each phase;
`--rounds` rounds alternate the two. Measured at the client, per request: TTFT (send to the first event with
content) and inter-chunk latencies (between content events). Reported per phase with the host's load
average beside it, and added = gateway percentile − direct percentile of the same round: TTFT p50 and p99,
inter-chunk p50 (targets: 8 ms, 25 ms, 2 ms at 50 req/s), and the CPU time each process of the stack spent per
request in each phase, the load generator's own included (what the pipeline costs, whatever the host's other
load). Every answer must be exactly
the emulator's deterministic text (` tok0 … tok<n-1>`) with one finish, once: a lost, repeated or reordered
chunk, or a missing answer, fails the run (exit 1).
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from aiokafka import AIOKafkaConsumer, TopicPartition

from app.commands.event_loop import run_service
from app.demo import namespaced
from app.local_services import LocalServices
from app.local_stack import child_env, start_gateways, start_pipeline
from app.namespace import remove_namespace
from app.readiness import StackProbes
from app.stack import Stack
from gateway.auth import key_digest
from lodestar.http_transport import aiohttp_transport
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.kafka_io import make_consumer
from lodestar.names import Topics
from lodestar.settings import Settings, load_settings
from sim.cluster import WorkerSpec

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
WORDS = tuple(f"{c}{v}" for c in "bdfgklmnprst" for v in ("a", "e", "i", "o", "u"))  # 60 short words
TARGETS = {"ttft_p50": 8.0, "ttft_p99": 25.0, "itl_p50": 2.0}


@dataclass
class Outcome:
    """One request's stream as the client saw it."""

    ttft_ms: float | None = None
    gaps_ms: list[float] = field(default_factory=list)
    text: str = ""
    finishes: int = 0
    done: int = 0
    error: str | None = None
    last_at: float | None = None  # perf_counter of the last content event


@dataclass
class Phase:
    label: str
    outcomes: list[Outcome]
    load_before: str
    load_after: str
    wall_s: float
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds each process of the stack used
    replies: int = 0  # messages the phase put on the gateway's reply topic (chunks and results)

    def ttfts(self) -> np.ndarray:
        return np.array([o.ttft_ms for o in self.outcomes if o.ttft_ms is not None])

    def gaps(self) -> np.ndarray:
        return np.array([g for o in self.outcomes for g in o.gaps_ms])


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_seconds(stack: Stack) -> dict[str, float]:
    """User + system CPU seconds of each running process of the stack so far (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for proc in stack.processes:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[proc.name.split("-")[0]] = (int(fields[11]) + int(fields[12])) / tick
    return out


async def reply_messages(offsets: AIOKafkaConsumer, partitions: list[TopicPartition]) -> int:
    """How many messages the gateway's reply topic holds so far (the sum of its partitions' end offsets)."""
    return sum((await offsets.end_offsets(partitions)).values())


def prompts(n: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, words)) + f" (request {i})" for i in range(n)]


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    return np.cumsum(np.random.default_rng(seed + 1).exponential(1.0 / rate, n))


async def one(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> Outcome:
    out = Outcome()
    body = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "ignore_eos": True}
    sent = time.perf_counter()
    try:
        async with http.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return out
            rest = b""
            async for chunk in response.aiter_bytes():  # lines split here: cheaper than aiter_lines
                now = time.perf_counter()
                rest += chunk
                *lines, rest = rest.split(b"\n")
                for line in lines:
                    if line.startswith(b"data: "):
                        consume(out, line[6:].decode(), now)
                        if out.ttft_ms is None and out.text:
                            out.ttft_ms = (now - sent) * 1000.0
    except httpx.HTTPError as exc:
        out.error = repr(exc)
    return out


def consume(out: Outcome, data: str, now: float) -> None:
    """One SSE event of a stream, into its outcome."""
    if data == "[DONE]":
        out.done += 1
        return
    event = json.loads(data)
    if "error" in event:
        out.error = str(event["error"])[:200]
        return
    for choice in event.get("choices") or ():
        content = (choice.get("delta") or {}).get("content")
        if content:
            if out.last_at is not None:
                out.gaps_ms.append((now - out.last_at) * 1000.0)
            out.last_at = now
            out.text += content
        if choice.get("finish_reason") is not None:
            out.finishes += 1


async def drive(url: str, texts: list[str], at: np.ndarray, max_tokens: int, headers: dict[str, str]) -> list[Outcome]:
    """Send request i at at[i] seconds (open loop: sends never wait for answers); every outcome, in order."""
    # aiohttp's transport: httpx's own costs the load generator twice the CPU per stream, and more the more
    # connections are open (lodestar/http_transport.py)
    async with httpx.AsyncClient(timeout=120, headers=headers, transport=aiohttp_transport()) as http:
        start = time.perf_counter()

        async def later(i: int) -> Outcome:
            await asyncio.sleep(max(0.0, start + at[i] - time.perf_counter()))
            return await one(http, url, texts[i], max_tokens)

        return list(await asyncio.gather(*(later(i) for i in range(len(texts)))))


def percentile(values: np.ndarray, q: float) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def check(phase: Phase, expected: str) -> list[str]:
    """What is wrong with the phase's answers (nothing lost, repeated or reordered)."""
    problems = []
    for i, o in enumerate(phase.outcomes):
        if o.error is not None:
            problems.append(f"{phase.label} request {i}: {o.error}")
        elif o.text != expected or o.finishes != 1 or o.done != 1:
            problems.append(f"{phase.label} request {i}: {len(o.text)} chars (expected {len(expected)}), "
                            f"{o.finishes} finishes, {o.done} [DONE]")
    return problems


async def run(settings: Settings, log_dir: Path, *, rate: float, duration_s: float, max_tokens: int,
              prompt_words: int, rounds: int, seed: int, policy: str, time_scale: float,
              echo: Callable[[str], None]) -> int:
    key = f"sk-bench-{uuid.uuid4().hex}"
    env = {"LODESTAR_GATEWAY__API_KEY_HASHES": json.dumps([key_digest(key)]),
           "LODESTAR_GATEWAY__MODEL_NAME": MODEL, "LODESTAR_GATEWAY__RATE_LIMIT_PER_S": str(max(rate * 4, 100)),
           "LODESTAR_GATEWAY__RATE_LIMIT_BURST": str(int(max(rate * 4, 100)))}
    n = int(rate * duration_s)
    texts = prompts(n, prompt_words, seed)
    at = arrivals(n, rate, seed)
    expected = "".join(f" tok{i}" for i in range(max_tokens))
    stack = Stack(log_dir, env=child_env(settings))
    phases: list[Phase] = []
    reply_topic = Topics(settings.kafka.topic_prefix).reply("bench")
    partitions = [TopicPartition(reply_topic, p) for p in range(settings.gateway.reply_partitions)]
    offsets = make_consumer(settings, group_id=None, client_id="bench-offsets")
    await offsets.start()
    try:
        await ensure_topics(settings, fixed_topic_partitions(settings))
        async with StackProbes(settings) as probes:
            engine_spec = WorkerSpec(worker_id="e0", gpu="H100", model="llama-3.1-8b")
            engines = await start_pipeline(stack, probes, [engine_spec], ["b0"], policy, time_scale=time_scale,
                                           learner=False, timeout_s=120)
            gateways = await start_gateways(stack, probes, ["bench"], env, timeout_s=120)
        engine, gateway = engines["e0"], gateways["bench"]
        targets = {"direct": (f"{engine}/v1/chat/completions", {}),
                   "gateway": (f"{gateway}/v1/chat/completions", {"Authorization": f"Bearer {key}"})}
        warm = prompts(20, prompt_words, seed + 99)
        for url, headers in targets.values():  # first requests pay for connections and lazy imports
            await drive(url, warm, arrivals(20, 20.0, seed), max_tokens, headers)
        echo(f"pipeline up; {n} requests per phase at {rate:g} req/s (Poisson, seed {seed}), chat with "
             f"{prompt_words}-word prompts, {max_tokens} tokens streamed; policy {policy}, time scale {time_scale:g}")
        async with httpx.AsyncClient() as http:
            for r in range(rounds):
                for label in ("direct", "gateway") if r % 2 == 0 else ("gateway", "direct"):
                    (await http.post(f"{engine}/flush_cache")).raise_for_status()
                    await asyncio.sleep(1.0)
                    url, headers = targets[label]
                    replied = await reply_messages(offsets, partitions)
                    before, cpu, mine = loadavg(), cpu_seconds(stack), time.process_time()
                    t0 = time.perf_counter()
                    outcomes = await drive(url, texts, at, max_tokens, headers)
                    used = {k: v - cpu.get(k, 0.0) for k, v in cpu_seconds(stack).items()}
                    used["client"] = time.process_time() - mine
                    phase = Phase(f"{label} r{r + 1}", outcomes, before, loadavg(), time.perf_counter() - t0, used,
                                  await reply_messages(offsets, partitions) - replied)
                    phases.append(phase)
                    echo(line(phase))
        stack.check()
    finally:
        await offsets.stop()
        stack.stop_all()
        await remove_namespace(settings)
    return report(phases, expected, rounds, echo)


def line(phase: Phase) -> str:
    t, g = phase.ttfts(), phase.gaps()
    ok = sum(o.error is None for o in phase.outcomes)
    n = max(len(phase.outcomes), 1)
    cpu = " ".join(f"{k} {1000 * v / n:.1f}" for k, v in sorted(phase.cpu_s.items()) if v > 0)
    replies = f" | Kafka replies/request {phase.replies / n:.1f}" if phase.replies else ""
    return (f"{phase.label:<11} {ok:>5}/{len(phase.outcomes):<5} TTFT p50 {percentile(t, 50):7.2f} p99 "
            f"{percentile(t, 99):7.2f} ms | inter-chunk p50 {percentile(g, 50):6.2f} p99 {percentile(g, 99):6.2f} "
            f"ms | {phase.wall_s:5.1f} s | load {phase.load_before} -> {phase.load_after} | CPU ms/request: {cpu}"
            f"{replies}")


def report(phases: list[Phase], expected: str, rounds: int, echo: Callable[[str], None]) -> int:
    problems = [p for phase in phases for p in check(phase, expected)]
    by = {p.label: p for p in phases}
    worst = dict.fromkeys(TARGETS, float("-inf"))
    for r in range(1, rounds + 1):
        d, g = by[f"direct r{r}"], by[f"gateway r{r}"]
        added = {"ttft_p50": percentile(g.ttfts(), 50) - percentile(d.ttfts(), 50),
                 "ttft_p99": percentile(g.ttfts(), 99) - percentile(d.ttfts(), 99),
                 "itl_p50": percentile(g.gaps(), 50) - percentile(d.gaps(), 50)}
        echo(f"added by the gateway, round {r}: TTFT p50 {added['ttft_p50']:+.2f} ms (target <= 8), "
             f"p99 {added['ttft_p99']:+.2f} ms (<= 25), inter-chunk p50 {added['itl_p50']:+.2f} ms (<= 2)")
        worst = {k: max(worst[k], v) for k, v in added.items()}
    met = [f"{k} {'met' if worst[k] <= TARGETS[k] else 'MISSED'}" for k in TARGETS]
    echo(f"worst round: {', '.join(met)}")
    total = sum(len(p.outcomes) for p in phases)
    echo(f"answers checked: {total - len(problems)}/{total} complete and exact (none lost, repeated or reordered)")
    for problem in problems[:10]:
        echo(f"  {problem}")
    return 1 if problems else 0


def bench_gateway(*, rate: float, duration_s: float, max_tokens: int, prompt_words: int, rounds: int, seed: int,
                  policy: str, time_scale: float, log_dir: Path, echo: Callable[[str], None] = print) -> int:
    """Run the benchmark (see the module doc); the exit status: 1 if an answer was lost or wrong."""
    base = load_settings()
    namespace = f"bgw{uuid.uuid4().hex[:6]}"
    settings = namespaced(base, namespace, log_dir)  # its own topics, keys, groups and snapshot signing key
    settings = settings.model_copy(update={"kafka": settings.kafka.model_copy(update={"request_partitions": 4})})
    services = LocalServices(settings, echo=echo)
    services.ensure_running()
    try:
        # the load generator on uvloop too: it must not be what runs out of CPU first
        return run_service(run(settings, log_dir, rate=rate, duration_s=duration_s, max_tokens=max_tokens,
                               prompt_words=prompt_words, rounds=rounds, seed=seed, policy=policy,
                               time_scale=time_scale, echo=echo))
    finally:
        services.stop_started()
