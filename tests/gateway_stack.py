"""The pipeline behind one or more gateways, as `lodestar` processes (app.local_stack, as `lodestar up` runs
them) on the real broker and Redis, under a topic and key prefix of its own (removed afterwards): for the
gateway's integration tests and the conformance suite's `gateway` target.

    with gateway_pipeline(tmp_path, api_key="sk-1") as pipe:
        httpx.post(f"{pipe.urls[0]}/v1/completions", ...)

One emulator (with `emulator_args`), its worker and a dispatcher, then the gateways, each ready when its
`/readyz` answers 200; a process that dies fails the test with its log tail (app.stack.StackError).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from app.local_stack import child_env, start_gateways, start_pipeline
from app.namespace import remove_namespace
from app.readiness import StackProbes
from app.stack import Stack
from gateway.auth import key_digest
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.settings import Settings
from sim.cluster import WorkerSpec

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the emulator's served name for llama-3.1-8b


@dataclass
class GatewayPipeline:
    """A running pipeline: its settings, processes, the gateways' base URLs (in id order) and engine URLs."""

    settings: Settings
    stack: Stack
    urls: list[str]
    engines: dict[str, str]

    @property
    def emulator_log(self) -> Path:
        return self.stack.log_dir / "emulator-e0.log"


def pipeline_settings() -> Settings:
    """Settings under a prefix of their own, on the configured broker and Redis; fails if they do not answer."""
    configured = Settings()
    host, _, port = configured.kafka.bootstrap_servers.split(",")[0].rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        pytest.fail(f"Kafka is not reachable at {configured.kafka.bootstrap_servers}; run `scripts/services start`")
    tag = f"gw{uuid.uuid4().hex[:10]}"
    return Settings(
        kafka={"bootstrap_servers": configured.kafka.bootstrap_servers, "topic_prefix": f"{tag}.",
               "request_partitions": 2, "results_partitions": 1, "telemetry_partitions": 1},
        redis={"url": configured.redis.url, "key_prefix": f"{tag}:"},
        dispatcher={"consumer_group": f"{tag}-dispatchers"},
        worker={"state_ttl_s": 3.0},
    )


@contextlib.contextmanager
def gateway_pipeline(
    log_dir: Path, *, emulator_args: Sequence[str] = (), api_key: str | None = None, gateways: int = 1,
    gateway_env: Mapping[str, str] | None = None, time_scale: float = 0.05, policy: str = "round_robin",
) -> Iterator[GatewayPipeline]:
    """Run the pipeline and `gateways` gateways until the block ends (see the module doc). With `api_key` the
    gateways accept that key only; without, they run anonymous (development mode)."""
    settings = pipeline_settings()
    env = {"LODESTAR_GATEWAY__MODEL_NAME": MODEL, "LODESTAR_TELEMETRY__LOG_JSON": "false", **(gateway_env or {})}
    if api_key is not None:
        env["LODESTAR_GATEWAY__API_KEY_HASHES"] = f'["{key_digest(api_key)}"]'
    else:
        env["LODESTAR_GATEWAY__ALLOW_ANONYMOUS"] = "true"
    stack = Stack(log_dir, env={**child_env(settings), "LODESTAR_TELEMETRY__LOG_JSON": "false"})
    engine = WorkerSpec(worker_id="e0", gpu="H100", model="llama-3.1-8b")

    # ports from a random base: test runs in other checkouts of this host start pipelines too, and two scans
    # from the same base may pick the same port before either binds it. Below Linux's ephemeral range (32768 up):
    # a port found free there may be taken by an outgoing connection (a Kafka client's) before the gateway binds it
    base = random.randrange(20_000, 32_000, 100)

    async def start() -> tuple[dict[str, str], dict[str, str]]:
        await ensure_topics(settings, fixed_topic_partitions(settings))
        async with StackProbes(settings) as probes:
            engines = await start_pipeline(stack, probes, [engine], ["d0"], policy, time_scale=time_scale,
                                           learner=False, timeout_s=120, emulator_args=emulator_args,
                                           port_base=base)
            urls = await start_gateways(stack, probes, [f"g{i}" for i in range(gateways)], env, timeout_s=120,
                                        port_base=base + 50)
            return engines, urls

    try:
        engines, urls = asyncio.run(start())
        yield GatewayPipeline(settings, stack, [urls[f"g{i}"] for i in range(gateways)], engines)
    finally:
        stack.stop_all()
        with contextlib.suppress(Exception):
            asyncio.run(remove_namespace(settings))
