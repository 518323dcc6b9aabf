"""The dispatcher on the real broker and Redis, with fake-heartbeated workers (no engines needed)."""

from __future__ import annotations

import asyncio
import json
import signal
import time

import pytest
from dispatcher_harness import (
    FakeWorkers,
    committed_total,
    dispatch_settings,
    produce_requests,
    running_dispatcher,
    shared_prefix_requests,
    wait_until,
)
from emulator_process import LODESTAR, ROOT
from worker_harness import TopicReader, isolated_settings, produce, require_services, settings_env

from lodestar.features import FEATURE_NAMES
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.names import RedisKeys, Topics
from lodestar.schemas import InferenceRequest, RoutedRequest, RoutingDecision
from lodestar.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def services() -> None:
    """Skip unless the broker and Redis answer."""
    require_services(isolated_settings())


@pytest.fixture
def settings(services: None) -> Settings:
    return dispatch_settings()


async def test_routes_requests_with_decisions_then_commits(settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    requests = shared_prefix_requests(24)
    async with FakeWorkers(settings) as workers:
        await workers.add("wa", "H100", max_kv_tokens=64_000)
        await workers.add("wb", "A100", running=3, max_kv_tokens=32_000)
        await produce_requests(settings, requests)
        async with running_dispatcher(settings) as service, \
                TopicReader(settings, topics.worker("wa"), topics.worker("wb")) as reader:
            await reader.wait_for(lambda m: sum(map(len, m.values())) >= len(requests), timeout=30)
            await wait_until(lambda: service.stats.routed >= len(requests), 10, "routing")
            got = await committed_total(settings, settings.dispatcher.consumer_group, topics.requests)
            assert got == len(requests)
            # each worker's prefix index is sized to its KV cache, in blocks
            capacities = await service.redis.hgetall(RedisKeys(settings.redis.key_prefix).prefix_capacity)
            tpb = settings.prefix.tokens_per_block
            assert {k.decode(): int(v) for k, v in capacities.items()} == {"wa": 64_000 // tpb, "wb": 32_000 // tpb}
            await reader.poll(0.5)
    routed = {wid: [RoutedRequest.model_validate(m) for m in reader.messages[topics.worker(wid)]]
              for wid in ("wa", "wb")}
    ids = [r.request.request_id for msgs in routed.values() for r in msgs]
    assert sorted(ids) == sorted(r.request_id for r in requests)  # each exactly once
    for wid, msgs in routed.items():
        assert msgs, f"least_request left {wid} idle"
        for m in msgs:
            d = m.decision
            assert d.worker_id == wid and d.policy == "least_request" and d.dispatcher_id == "d1"
            assert set(d.features) == set(FEATURE_NAMES) and d.attempt == 0
            assert d.features["prompt_tokens"] == 84.0
    # requests after the first on a worker find the shared 64-token system prompt in the prefix index
    assert sum(m.decision.matched_prefix_tokens == 64 for msgs in routed.values() for m in msgs) >= len(requests) - 2


async def test_malformed_input_goes_to_the_dlq_with_its_reason(settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    good = InferenceRequest(prompt="hello there")
    bad = [
        b"not json at all",
        json.dumps({"request_id": "no-prompt"}).encode(),
        json.dumps({"prompt": "x", "schema_version": 9}).encode(),
        json.dumps({"prompt": "x", "reply_to": "bad topic!"}).encode(),
    ]
    async with FakeWorkers(settings) as workers:
        await workers.add("wa")
        await produce(settings, topics.requests, [*bad, good.to_bytes()])
        async with running_dispatcher(settings), TopicReader(settings, topics.dlq, topics.worker("wa")) as reader:
            await reader.wait_for(lambda m: len(m[topics.dlq]) >= 4 and m[topics.worker("wa")], timeout=30)
    reasons = sorted(m["reason"] for m in reader.messages[topics.dlq])
    assert len(reasons) == 4
    assert all(m["stage"] == "validate" and m["service"] == "dispatcher" for m in reader.messages[topics.dlq])
    assert any("Invalid JSON" in r for r in reasons)
    assert any("exactly one of a non-empty `prompt`" in r for r in reasons)
    assert any("schema_version" in r for r in reasons)
    assert any("reply_to: String should match pattern" in r for r in reasons)
    assert {m["payload"] for m in reader.messages[topics.dlq]} == {b.decode() for b in bad}
    assert [m["request"]["request_id"] for m in reader.messages[topics.worker("wa")]] == [good.request_id]


async def test_two_dispatchers_share_the_partitions(settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    requests = shared_prefix_requests(40)
    async with FakeWorkers(settings) as workers:
        await workers.add("wa")
        async with running_dispatcher(settings, "d1") as one, running_dispatcher(settings, "d2") as two:
            await wait_until(lambda: len(one.assigned_partitions()) + len(two.assigned_partitions())
                             == settings.kafka.request_partitions, 20, "a balanced group")
            assert not one.assigned_partitions() & two.assigned_partitions()
            async with TopicReader(settings, topics.worker("wa")) as reader:
                await produce_requests(settings, requests)
                await reader.wait_for(lambda m: len(m[topics.worker("wa")]) >= len(requests), timeout=30)
                await reader.poll(0.5)
    msgs = [RoutedRequest.model_validate(m) for m in reader.messages[topics.worker("wa")]]
    assert sorted(m.request.request_id for m in msgs) == sorted(r.request_id for r in requests)
    assert {m.decision.dispatcher_id for m in msgs} == {"d1", "d2"}


async def test_requests_wait_uncommitted_for_a_worker_then_route(services: None) -> None:
    settings = dispatch_settings(no_worker_max_wait_s=60.0)
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    requests = shared_prefix_requests(5)
    async with FakeWorkers(settings) as workers, running_dispatcher(settings) as service:
        await produce_requests(settings, requests)
        await asyncio.sleep(1.5)
        assert service.stats.routed == 0
        assert await committed_total(settings, settings.dispatcher.consumer_group, topics.requests) == 0
        await workers.add("late")
        async with TopicReader(settings, topics.worker("late")) as reader:
            await reader.wait_for(lambda m: len(m[topics.worker("late")]) >= len(requests), timeout=30)
        await wait_until(lambda: service.stats.routed == len(requests), 10, "routing")
        assert await committed_total(settings, settings.dispatcher.consumer_group, topics.requests) == len(requests)


async def test_requests_are_rejected_to_the_client_after_the_wait_bound(services: None) -> None:
    settings = dispatch_settings(no_worker_max_wait_s=0.5)
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    request = InferenceRequest(prompt="anyone there?", reply_to=f"{settings.kafka.topic_prefix}reply.rejections")
    async with running_dispatcher(settings), TopicReader(settings, request.reply_to or "", topics.dlq) as reader:
        await produce_requests(settings, [request])
        await reader.wait_for(lambda m: m[request.reply_to or ""] and m[topics.dlq], timeout=30)
    (result,) = reader.messages[request.reply_to or ""]
    assert result["request_id"] == request.request_id and result["status"] == "rejected"
    assert "no live worker" in result["error"] and "no live worker" in reader.messages[topics.dlq][0]["reason"]


async def test_dead_worker_backlog_is_rerouted_to_live_workers(services: None) -> None:
    settings = dispatch_settings(dead_worker_timeout_s=1.0)
    topics = Topics(settings.kafka.topic_prefix)
    keys = RedisKeys(settings.redis.key_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    backlog = [RoutedRequest(request=r, decision=RoutingDecision(worker_id="gone", policy="x", attempt=1))
               for r in shared_prefix_requests(4)]
    async with FakeWorkers(settings) as workers, running_dispatcher(settings) as service:
        await workers.add("gone")
        await workers.add("alive")
        await service.prefix_index.insert("gone", (1, 2, 3), 1.0)
        await wait_until(lambda: "gone" in {w.worker_id for w in service.view.live}, 5, "registry view")
        await asyncio.sleep(service.takeover.check_every_s * 2)  # the takeover has recorded its heartbeat
        await produce(settings, topics.worker("gone"), [m.to_bytes() for m in backlog])
        await workers.kill("gone")
        async with TopicReader(settings, topics.worker("alive")) as reader:
            await reader.wait_for(lambda m: len(m[topics.worker("alive")]) >= len(backlog), timeout=30)
        await wait_until(lambda: service.takeover.rerouted == len(backlog), 10, "takeover accounting")
        assert await committed_total(settings, topics.worker_group("gone"), topics.worker("gone")) == len(backlog)
        deadline = time.monotonic() + 10
        while b"gone" in (seen := await service.redis.zrange(keys.workers_seen, 0, -1)):
            assert time.monotonic() < deadline, "the dead worker was never forgotten"
            await asyncio.sleep(0.1)
        assert await service.prefix_index.size("gone") == 0
    msgs = [RoutedRequest.model_validate(m) for m in reader.messages[topics.worker("alive")]]
    assert sorted(m.request.request_id for m in msgs) == sorted(m.request.request_id for m in backlog)
    assert all(m.decision.attempt == 2 and m.decision.worker_id == "alive" for m in msgs)
    assert b"gone" not in seen and b"alive" in seen


async def test_the_lodestar_dispatcher_command_routes_and_stops_on_sigterm(settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    env = {**settings_env(settings), "LODESTAR_DISPATCHER__CONSUMER_GROUP": settings.dispatcher.consumer_group}
    request = InferenceRequest(prompt="from the command line")
    async with FakeWorkers(settings) as workers:
        await workers.add("wa")
        proc = await asyncio.create_subprocess_exec(
            LODESTAR, "dispatcher", "--policy", "round_robin", "--id", "cli-1", env=env, cwd=ROOT,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        try:
            async with TopicReader(settings, topics.worker("wa")) as reader:
                await produce_requests(settings, [request])
                await reader.wait_for(lambda m: m[topics.worker("wa")], timeout=60)
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    (msg,) = reader.messages[topics.worker("wa")]
    assert msg["request"]["request_id"] == request.request_id
    assert msg["decision"]["dispatcher_id"] == "cli-1" and msg["decision"]["policy"] == "round_robin"
    assert b"stopped after routing 1 requests" in stderr
