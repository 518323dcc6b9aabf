"""The Lodestar pipeline as local processes: their command lines, their environment, and the order in
which they are brought up and checked ready (used by `lodestar up` and the end-to-end tests).

Every process is the `lodestar` CLI run by this interpreter (`python -m app.cli ...`), so this
module imports no service: they meet only through Kafka, Redis and the settings passed in the
environment. Bring-up: the emulators (ready when `/health` answers, i.e. warmed up), then the workers,
the learner and the dispatchers at once; ready when every worker is live in the registry and the
learner's and dispatchers' consumer groups are stable with every member in them.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from app.readiness import StackProbes
from app.stack import ProcessSpec, Stack
from lodestar.settings import Settings, settings_env

LODESTAR_CMD = (sys.executable, "-m", "app.cli")
# Where free_ports starts counting: below Linux's ephemeral range (32768-60999 by default), from which the kernel
# picks the local port of every outgoing connection (a Kafka or Redis client's), so that a port found free here is
# not taken by one before the emulator or gateway binds it; apart from scripts/services' 16379-16380 and
# 19092-19094, SGLang's default 30000 and scripts/chaos.py's bases
EMULATOR_PORT_BASE = 21000
GATEWAY_PORT_BASE = 25000
EMULATORS, WORKERS, LEARNER, DISPATCHERS, GATEWAYS = "emulators", "workers", "learner", "dispatchers", "gateways"


class Engine(Protocol):
    """One engine of a cluster (sim.cluster.WorkerSpec is one): its worker id, GPU type and model."""

    @property
    def worker_id(self) -> str: ...
    @property
    def gpu(self) -> str: ...
    @property
    def model(self) -> str: ...


def child_env(settings: Settings) -> dict[str, str]:
    """Environment giving a child these settings' broker and Redis (with their security), topic layout,
    prefixes, snapshot keys, dev mode, groups and learner and worker cadences (what differs from the defaults
    in a demo or a test)."""
    w, d, lr = settings.worker, settings.dispatcher, settings.learner
    return {
        **settings_env(settings, "kafka", "redis", "snapshot_signing", "dev_mode"),
        "LODESTAR_WORKER__STATE_TTL_S": str(w.state_ttl_s),
        "LODESTAR_WORKER__MAX_CONCURRENCY": str(w.max_concurrency),
        "LODESTAR_DISPATCHER__CONSUMER_GROUP": d.consumer_group,
        "LODESTAR_DISPATCHER__DEAD_WORKER_TIMEOUT_S": str(d.dead_worker_timeout_s),
        "LODESTAR_LEARNER__MODEL": lr.model,
        "LODESTAR_LEARNER__CONSUMER_GROUP": lr.consumer_group,
        "LODESTAR_LEARNER__CHECKPOINT_PATH": str(lr.checkpoint_path),
        "LODESTAR_LEARNER__SNAPSHOT_EVERY_EVENTS": str(lr.snapshot_every_events),
        "LODESTAR_LEARNER__SNAPSHOT_EVERY_S": str(lr.snapshot_every_s),
    }


def emulator_spec(engine: Engine, port: int, time_scale: float, extra_args: Sequence[str] = ()) -> ProcessSpec:
    return ProcessSpec(f"emulator-{engine.worker_id}", [
        *LODESTAR_CMD, "emulator", "--gpu", engine.gpu, "--model", engine.model, "--port", str(port),
        "--time-scale", f"{time_scale:g}", "--log-level", "warning", *extra_args,
    ], group=EMULATORS)


def worker_spec(engine: Engine, url: str) -> ProcessSpec:
    return ProcessSpec(f"worker-{engine.worker_id}", [
        *LODESTAR_CMD, "worker", "--id", engine.worker_id, "--sglang-url", url, "--gpu-type", engine.gpu,
    ], group=WORKERS)


def dispatcher_spec(dispatcher_id: str, policy: str) -> ProcessSpec:
    """A dispatcher whose policy comes from the environment (LODESTAR_DISPATCHER__POLICY)."""
    return ProcessSpec(f"dispatcher-{dispatcher_id}", [*LODESTAR_CMD, "dispatcher", "--id", dispatcher_id],
                       env={"LODESTAR_DISPATCHER__POLICY": policy}, group=DISPATCHERS)


def gateway_spec(gateway_id: str, port: int, env: Mapping[str, str]) -> ProcessSpec:
    """A gateway on loopback `port`; `env` carries its settings (API key digests, limits)."""
    return ProcessSpec(f"gateway-{gateway_id}", [
        *LODESTAR_CMD, "gateway", "--id", gateway_id, "--host", "127.0.0.1", "--port", str(port),
    ], env=env, group=GATEWAYS)


LEARNER_SPEC = ProcessSpec("learner", [*LODESTAR_CMD, "learner"], group=LEARNER)


def free_ports(n: int, start: int = EMULATOR_PORT_BASE) -> list[int]:
    """`n` loopback ports free right now, counting up from `start`."""
    ports: list[int] = []
    candidate = start
    while len(ports) < n:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", candidate))
            except OSError:
                candidate += 1
                continue
        ports.append(candidate)
        candidate += 1
    return ports


async def start_pipeline(
    stack: Stack,
    probes: StackProbes,
    engines: Sequence[Engine],
    dispatcher_ids: Sequence[str],
    policy: str,
    *,
    time_scale: float = 1.0,
    learner: bool = True,
    timeout_s: float = 180.0,
    echo: Callable[[str], None] = lambda _: None,
    emulator_args: Sequence[str] = (),
    port_base: int = EMULATOR_PORT_BASE,
) -> dict[str, str]:
    """Start and wait for emulators (with `emulator_args`, on free ports from `port_base` up), workers, the
    learner and the dispatchers; returns worker id -> engine URL."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    urls: dict[str, str] = {}
    for engine, port in zip(engines, free_ports(len(engines), port_base), strict=True):
        stack.start(emulator_spec(engine, port, time_scale, emulator_args))
        urls[engine.worker_id] = f"http://127.0.0.1:{port}"

    async def engines_healthy() -> bool:
        return all(await asyncio.gather(*(probes.engine_healthy(u) for u in urls.values())))

    await stack.wait_ready(engines_healthy, timeout_s, "emulators")
    echo(f"{len(urls)} emulators healthy after {loop.time() - t0:.1f} s")
    for engine in engines:
        stack.start(worker_spec(engine, urls[engine.worker_id]))
    if learner:
        stack.start(LEARNER_SPEC)
    for dispatcher_id in dispatcher_ids:
        stack.start(dispatcher_spec(dispatcher_id, policy))
    await wait_workers(stack, probes, list(urls), timeout_s)
    echo(f"{len(urls)} workers registered after {loop.time() - t0:.1f} s")
    if learner:
        await wait_group(stack, probes, probes.settings.learner.consumer_group, ["learner"], timeout_s)
    await wait_dispatchers(stack, probes, dispatcher_ids, timeout_s)
    echo(f"{'learner and ' if learner else ''}dispatchers {', '.join(dispatcher_ids)} ({policy}) joined their "
         f"groups after {loop.time() - t0:.1f} s")
    return urls


async def wait_workers(stack: Stack, probes: StackProbes, worker_ids: Sequence[str], timeout_s: float) -> None:
    """Wait until every one of `worker_ids` is live in the registry."""
    async def live() -> bool:
        return set(worker_ids) <= await probes.live_workers()

    await stack.wait_ready(live, timeout_s, f"workers {', '.join(worker_ids)}")


async def wait_group(stack: Stack, probes: StackProbes, group: str, client_ids: Sequence[str],
                     timeout_s: float) -> None:
    """Wait until the consumer group is stable with (at least) these member client ids."""
    async def joined() -> bool:
        state = await probes.group(group)
        return state.stable and set(client_ids) <= set(state.client_ids)

    await stack.wait_ready(joined, timeout_s, f"consumer group {group} with {', '.join(client_ids)}")


async def wait_dispatchers(stack: Stack, probes: StackProbes, dispatcher_ids: Sequence[str], timeout_s: float) -> None:
    """Wait until these dispatchers share the requests topic's partitions (their group is stable)."""
    await wait_group(stack, probes, probes.settings.dispatcher.consumer_group,
                     [f"dispatcher-{d}" for d in dispatcher_ids], timeout_s)


async def restart_dispatchers(stack: Stack, probes: StackProbes, dispatcher_ids: Sequence[str], policy: str,
                              timeout_s: float = 180.0) -> None:
    """Stop every running dispatcher (SIGTERM: each leaves the group) and start these ones on `policy`."""
    stack.stop_group(DISPATCHERS)
    for dispatcher_id in dispatcher_ids:
        stack.start(dispatcher_spec(dispatcher_id, policy))
    await wait_dispatchers(stack, probes, dispatcher_ids, timeout_s)


async def start_gateways(stack: Stack, probes: StackProbes, gateway_ids: Sequence[str], env: Mapping[str, str],
                         timeout_s: float = 180.0, port_base: int = GATEWAY_PORT_BASE) -> dict[str, str]:
    """Start gateways on free loopback ports (from `port_base` up) and wait until each is ready (`/readyz`);
    gateway id -> base URL."""
    urls: dict[str, str] = {}
    for gateway_id, port in zip(gateway_ids, free_ports(len(gateway_ids), port_base), strict=True):
        stack.start(gateway_spec(gateway_id, port, env))
        urls[gateway_id] = f"http://127.0.0.1:{port}"

    async def ready() -> bool:
        return all(await asyncio.gather(*(probes.gateway_ready(u) for u in urls.values())))

    await stack.wait_ready(ready, timeout_s, f"gateways {', '.join(gateway_ids)}")
    return urls
