"""The client library and `lodestar submit` through Kafka, a worker and an emulator.

No dispatcher here: a forwarder in the test routes every request on `requests` to worker w1, so
the client's own path (produce, reply consumer, dedupe) is what is exercised.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator

import pytest
from emulator_process import LODESTAR, ROOT
from worker_harness import (
    TopicReader,
    cleanup,
    create_topics,
    isolated_settings,
    produce,
    running_worker,
    settings_env,
)

from lodestar.client import LodestarClient, reply_topic_for
from lodestar.kafka_io import make_consumer, make_producer
from lodestar.names import Topics
from lodestar.schemas import InferenceRequest, RoutedRequest, RoutingDecision, SamplingParams, decode
from lodestar.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def settings(kafka_bootstrap: str, redis_url: str, engine_url: str) -> AsyncIterator[Settings]:
    """Worker w1 in front of the emulator, on topics and keys of its own (removed afterwards)."""
    isolated = isolated_settings(kafka_bootstrap, redis_url, sglang_url=engine_url)
    await create_topics(isolated)
    yield isolated
    await cleanup(isolated)


@contextlib.asynccontextmanager
async def forward_requests_to_w1(settings: Settings) -> AsyncIterator[None]:
    """Stand-in for the dispatcher: every InferenceRequest is routed to worker w1."""
    topics = Topics(settings.kafka.topic_prefix)
    consumer = make_consumer(settings, topics.requests, group_id=None, client_id="test-forwarder")
    producer = make_producer(settings, client_id="test-forwarder")
    await consumer.start()
    await producer.start()

    async def forward() -> None:
        async for record in consumer:
            request = decode(InferenceRequest, record.value)
            routed = RoutedRequest(request=request, decision=RoutingDecision(worker_id="w1", policy="forwarder"))
            await producer.send_and_wait(topics.worker("w1"), routed.to_bytes(), key=request.request_id.encode())

    task = asyncio.create_task(forward())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await consumer.stop()
        await producer.stop()


async def test_generate_returns_the_result_once_even_when_it_is_delivered_twice(settings: Settings):
    topics = Topics(settings.kafka.topic_prefix)
    async with running_worker(settings), forward_requests_to_w1(settings), LodestarClient(settings) as client:
        result = await client.generate(prompt="what is a lodestar", sampling=SamplingParams(max_new_tokens=6),
                                       session_id="s1", timeout_s=30)
        assert result.status == "ok" and result.worker_id == "w1" and result.completion_tokens == 6
        # A second copy of that result (a worker that died between publishing and marking it done):
        await produce(settings, topics.results, [result.to_bytes()], key=result.request_id.encode())
        later = await client.generate(prompt="and another", sampling=SamplingParams(max_new_tokens=2), timeout_s=30)
        assert later.status == "ok" and later.request_id != result.request_id
        for _ in range(50):
            if client.duplicate_results:
                break
            await asyncio.sleep(0.1)
        assert client.duplicate_results == 1

        requests = [InferenceRequest(prompt=f"question {i}", sampling=SamplingParams(max_new_tokens=3))
                    for i in range(5)]
        results = await client.submit_many(requests, timeout_s=30)
        assert [r.request_id for r in results if r is not None] == [r.request_id for r in requests]


async def test_a_private_reply_topic_receives_this_clients_results(settings: Settings):
    topics = Topics(settings.kafka.topic_prefix)
    reply = reply_topic_for("it-client", topics)
    async with (
        running_worker(settings),
        forward_requests_to_w1(settings),
        LodestarClient(settings, reply_topic=reply) as client,
        TopicReader(settings, topics.results) as shared,
    ):
        result = await client.generate(input_ids=[11, 12, 13, 14], sampling=SamplingParams(max_new_tokens=4),
                                       timeout_s=30)
        await shared.poll(0.5)
    assert result.status == "ok" and result.prompt_tokens >= 4 and result.completion_tokens == 4
    assert shared.messages[topics.results] == []


async def test_submit_command_prints_the_result(settings: Settings):
    async with running_worker(settings), forward_requests_to_w1(settings):
        proc = await asyncio.create_subprocess_exec(
            LODESTAR, "submit", "hello from the command line", "--max-new-tokens", "5", "--timeout", "30",
            env=settings_env(settings), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    printed = json.loads(out)
    assert printed["status"] == "ok" and printed["completion_tokens"] == 5 and printed["worker_id"] == "w1"
