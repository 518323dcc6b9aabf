"""End to end: a worker killed with SIGKILL in the middle of a run loses no request.

Two H100 emulators and their workers (2 requests at a time each, so a backlog waits in each worker's
topic), one round-robin dispatcher, requests through the client library. Once the victim has answered a
few requests it is SIGKILLed with the rest of its share in flight or waiting. Either it comes back
(its backlog is served after the restart), or it stays dead past `dispatcher.dead_worker_timeout_s`
and the dispatcher re-routes its backlog to the live worker. Each test has its own pipeline.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest
from stack_harness import Pipeline, e2e_settings, engines, running_pipeline, shared_prefix_requests
from worker_harness import TopicReader

from app.local_stack import wait_workers, worker_spec
from lodestar.client import LodestarClient
from lodestar.schemas import InferenceResult, TelemetryEvent, now_ms

pytestmark = pytest.mark.integration

VICTIM, SURVIVOR = "h100-0", "h100-1"
REQUESTS = 40
MAX_NEW_TOKENS = 64  # ~0.5 s per request on an H100 at time scale 1: the victim's share takes ~5 s
ANSWERED_BEFORE_KILL = 4


def crash_pipeline(tmp_path: Path, dead_worker_timeout_s: float) -> AbstractAsyncContextManager[Pipeline]:
    settings = e2e_settings(tmp_path / "learner.json", worker={"max_concurrency": 2},
                            dispatcher={"dead_worker_timeout_s": dead_worker_timeout_s})
    return running_pipeline(settings, tmp_path / "logs", engines("H100", "H100"), ["crash-1"], "round_robin",
                            learner=False)


async def run_with_a_crash(pipeline: Pipeline, after_kill: Callable[[], Awaitable[None]]) -> tuple[
        list[InferenceResult | None], list[InferenceResult], dict[str, TelemetryEvent]]:
    """Send the requests, SIGKILL the victim once it has answered a few, call `after_kill`, collect."""
    topics = pipeline.topics
    requests = shared_prefix_requests(REQUESTS, MAX_NEW_TOKENS)
    async with (LodestarClient(pipeline.settings) as client,
                TopicReader(pipeline.settings, topics.results, topics.telemetry) as reader):
        answering = asyncio.create_task(client.submit_many(requests, timeout_s=120))
        await reader.wait_for(
            lambda m: sum(r["worker_id"] == VICTIM for r in m[topics.results]) >= ANSWERED_BEFORE_KILL, timeout=60)
        assert pipeline.stack.kill(f"worker-{VICTIM}") == -9
        answered_then = {r["request_id"] for r in reader.messages[topics.results]}
        assert len(answered_then) < REQUESTS - 5, "the victim had no backlog left to lose"
        await after_kill()
        answers = await answering
        await reader.wait_for(lambda m: len({r["request_id"] for r in m[topics.results]}) >= REQUESTS, timeout=30)
        await reader.poll(1.0)
    sent = [r.request_id for r in requests]
    assert [a.request_id if a else None for a in answers] == sent, "a request got no result"
    assert all(a is not None and a.status == "ok" for a in answers), Counter(a and a.status for a in answers)
    results = [InferenceResult.model_validate(m) for m in reader.messages[topics.results]]
    assert set(Counter(r.request_id for r in results)) == set(sent)  # duplicates possible after a SIGKILL
    events = {}
    for m in reader.messages[topics.telemetry]:
        event = TelemetryEvent.model_validate(m)
        events[event.request_id] = event
    return answers, results, events


async def test_a_killed_worker_serves_its_backlog_after_a_restart(tmp_path: Path) -> None:
    async with crash_pipeline(tmp_path, dead_worker_timeout_s=120) as pipeline:
        restarted_at: list[float] = []

        async def restart() -> None:
            await asyncio.sleep(1.0)
            victim = next(e for e in engines("H100", "H100") if e.worker_id == VICTIM)
            pipeline.stack.start(worker_spec(victim, pipeline.urls[VICTIM]))
            await wait_workers(pipeline.stack, pipeline.probes, [VICTIM], 60)
            restarted_at.append(now_ms())

        answers, _, events = await run_with_a_crash(pipeline, restart)
    served_after_restart = [a for a in answers if a and a.worker_id == VICTIM and a.completed_at > restarted_at[0]]
    assert served_after_restart, "the restarted worker served none of its backlog"
    assert all(e.decision.attempt == 0 for e in events.values()), "nothing should be re-routed"


async def test_a_worker_dead_past_the_timeout_has_its_backlog_rerouted(tmp_path: Path) -> None:
    async def stay_dead() -> None:
        pass

    async with crash_pipeline(tmp_path, dead_worker_timeout_s=2.0) as pipeline:
        answers, _, events = await run_with_a_crash(pipeline, stay_dead)
    rerouted = [e for e in events.values() if e.decision.attempt >= 1]
    assert rerouted, "the dead worker's backlog was not re-routed"
    assert {e.decision.worker_id for e in rerouted} == {SURVIVOR}
    by_id = {a.request_id: a for a in answers if a}
    assert all(by_id[e.request_id].worker_id == SURVIVOR for e in rerouted)
