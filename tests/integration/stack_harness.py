"""Helpers for the end-to-end tests: the whole pipeline as `lodestar` processes (app.local_stack,
the same bring-up as `lodestar up`) under settings no other test shares, plus request builders.

The broker and Redis come from the conftest's `kafka_bootstrap` and `redis_url` fixtures; topics and
keys are removed afterwards (worker_harness.cleanup). Process logs go to the test's tmp directory and
a process that dies unexpectedly fails the test with its log tail (app.stack.StackError)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker_harness import TopicReader, cleanup, isolated_settings

from app.local_stack import child_env, start_pipeline
from app.readiness import StackProbes
from app.stack import Stack
from lodestar.client import LodestarClient
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.names import Topics
from lodestar.schemas import InferenceRequest, InferenceResult, SamplingParams, TelemetryEvent
from lodestar.settings import Settings
from sim.cluster import WorkerSpec

MODEL = "llama-3.1-8b"


def e2e_settings(checkpoint: Path, *, dispatcher: dict[str, Any] | None = None, learner: dict[str, Any] | None = None,
                 worker: dict[str, Any] | None = None) -> Settings:
    """Isolated settings (own topics, keys, consumer groups and learner checkpoint), 4 request partitions,
    and worker leases short enough for crash tests (2 s)."""
    s = isolated_settings()
    prefix = s.kafka.topic_prefix
    return s.model_copy(update={
        "kafka": s.kafka.model_copy(update={"request_partitions": 4}),
        "worker": s.worker.model_copy(update={"state_ttl_s": 2.0, **(worker or {})}),
        "dispatcher": s.dispatcher.model_copy(update={"consumer_group": f"{prefix}dispatchers", **(dispatcher or {})}),
        "learner": s.learner.model_copy(update={"consumer_group": f"{prefix}learner", "checkpoint_path": checkpoint,
                                                **(learner or {})}),
    })


def engines(*gpus: str) -> list[WorkerSpec]:
    """One engine per GPU type given, with ids like `h100-0`, `l4-0`, `h100-1`."""
    counts: dict[str, int] = {}
    out = []
    for gpu in gpus:
        n = counts.get(gpu, 0)
        counts[gpu] = n + 1
        out.append(WorkerSpec(worker_id=f"{gpu.lower()}-{n}", gpu=gpu, model=MODEL))
    return out


@dataclass
class Pipeline:
    """A running pipeline: its settings, processes, probes and engine URLs by worker id."""

    settings: Settings
    stack: Stack
    probes: StackProbes
    urls: dict[str, str]

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.kafka.topic_prefix)


@contextlib.asynccontextmanager
async def running_pipeline(
    settings: Settings, log_dir: Path, cluster: Sequence[WorkerSpec], dispatcher_ids: Sequence[str], policy: str,
    *, learner: bool = True, time_scale: float = 1.0, extra_env: dict[str, str] | None = None,
    group_env: dict[str, dict[str, str]] | None = None,
) -> AsyncIterator[Pipeline]:
    """Start emulators, workers, (the learner) and dispatchers, every process with `extra_env` added to the
    settings' environment and a group's processes with `group_env[group]` (app.local_stack's group names);
    stop them and remove topics and keys after."""
    await ensure_topics(settings, fixed_topic_partitions(settings))
    stack = Stack(log_dir, env={**child_env(settings), **(extra_env or {})}, group_env=group_env)
    try:
        async with StackProbes(settings) as probes:
            urls = await start_pipeline(stack, probes, cluster, dispatcher_ids, policy, time_scale=time_scale,
                                        learner=learner, timeout_s=120)
            yield Pipeline(settings, stack, probes, urls)
    finally:
        stack.stop_all()
        await cleanup(settings)


def shared_prefix_requests(n: int, max_new_tokens: int, groups: int = 4, tag: str | None = None
                           ) -> list[InferenceRequest]:
    """`n` token prompts: one of `groups` shared 256-token system prompts, then 32 tokens of their own."""
    tag = tag or uuid.uuid4().hex[:6]
    return [
        InferenceRequest(
            request_id=f"{tag}-{i}",
            input_ids=[1000 + 997 * (i % groups) + t for t in range(256)] + [50_000 + 32 * i + t for t in range(32)],
            sampling=SamplingParams(max_new_tokens=max_new_tokens),
        )
        for i in range(n)
    ]


@dataclass
class Run:
    """Two waves of requests through the client, with a published snapshot in between."""

    waves: list[list[InferenceRequest]]
    answers: list[InferenceResult | None]
    duplicates_seen_by_client: int
    results_on_topic: list[InferenceResult]
    telemetry: dict[str, TelemetryEvent]
    snapshot_version: int

    @property
    def sent(self) -> list[str]:
        return [r.request_id for wave in self.waves for r in wave]


async def two_waves(pipeline: Pipeline, waves: list[list[InferenceRequest]], rate_per_s: float,
                    client_settings: Settings | None = None) -> Run:
    """Send the first wave through the client (made with `client_settings`, default the pipeline's), wait for
    the learner's first snapshot, send the second; read every result and telemetry event off their topics
    (and a second for late duplicates)."""
    topics = pipeline.topics
    async with (LodestarClient(client_settings or pipeline.settings) as client,
                TopicReader(pipeline.settings, topics.results, topics.telemetry) as reader):
        answers = await client.submit_many(waves[0], rate_per_s=rate_per_s, timeout_s=60)
        deadline = time.monotonic() + 30
        while (snapshot := await pipeline.probes.snapshot()) is None:
            assert time.monotonic() < deadline, "the learner published no snapshot within 30 s"
            await asyncio.sleep(0.2)
        await asyncio.sleep(1.0)  # the announcement reaches the dispatchers (pub/sub, milliseconds)
        answers += await client.submit_many(waves[1], rate_per_s=rate_per_s, timeout_s=60)
        n = sum(map(len, waves))
        await reader.wait_for(lambda m: len(m[topics.results]) >= n and len(m[topics.telemetry]) >= n, timeout=30)
        await reader.poll(1.0)  # a duplicate would arrive now
        duplicates = client.duplicate_results
    events = [TelemetryEvent.model_validate(m) for m in reader.messages[topics.telemetry]]
    return Run(waves, answers, duplicates, [InferenceResult.model_validate(m) for m in reader.messages[topics.results]],
               {e.request_id: e for e in events}, snapshot.version)
