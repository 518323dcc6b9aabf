"""The gateway in front of the real pipeline (an emulator, its worker, a dispatcher; the real Kafka broker and
Redis): the official openai client for chat and completions, streamed and not, with n and logprobs, and its
errors; a client that disconnects aborts its generation on the engine; two gateways each read only their own
replies; plain Kafka clients, the client library and the demo's gateway traffic stream too."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from gateway_stack import MODEL, GatewayPipeline, gateway_pipeline
from worker_harness import TopicReader

from app.gateway_traffic import GatewayTraffic
from lodestar.client import LodestarClient
from lodestar.kafka_admin import ensure_topics
from lodestar.kafka_io import make_consumer, make_producer
from lodestar.names import Topics
from lodestar.schemas import InferenceRequest, SamplingParams

pytestmark = pytest.mark.integration

KEY = "sk-integration-test"


@pytest.fixture(scope="module")
def pipe(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayPipeline]:
    with gateway_pipeline(tmp_path_factory.mktemp("gateway"), api_key=KEY, gateways=2) as running:
        yield running


def client(pipe: GatewayPipeline, gateway: int = 0, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=f"{pipe.urls[gateway]}/v1", timeout=60, max_retries=0)


MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


def test_chat(pipe: GatewayPipeline) -> None:
    response = client(pipe).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=0)
    assert response.id.startswith("chatcmpl-") and response.model == MODEL
    assert response.choices[0].message.role == "assistant" and response.choices[0].message.content
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 8 and response.usage.prompt_tokens > 0


def test_chat_stream_with_n_and_logprobs(pipe: GatewayPipeline) -> None:
    stream = client(pipe).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=6, n=2, logprobs=True, top_logprobs=2, stream=True,
        stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    finishes: dict[int, int] = {}
    tokens: dict[int, int] = {}
    usage = None
    ids = set()
    for chunk in stream:
        ids.add(chunk.id)
        if chunk.usage is not None:
            usage = chunk.usage
            continue
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        if choice.logprobs is not None and choice.logprobs.content:
            tokens[choice.index] = tokens.get(choice.index, 0) + len(choice.logprobs.content)
            assert len(choice.logprobs.content[0].top_logprobs) == 2
        if choice.finish_reason is not None:
            finishes[choice.index] = finishes.get(choice.index, 0) + 1
    assert len(ids) == 1 and sorted(texts) == [0, 1] and all(texts.values())
    assert finishes == {0: 1, 1: 1} and tokens == {0: 6, 1: 6}
    assert usage is not None and usage.completion_tokens == 12


def test_completions_batch_with_echo_and_logprobs(pipe: GatewayPipeline) -> None:
    response = client(pipe).completions.create(model=MODEL, prompt=["The sky is", "Grass is"], max_tokens=4,
                                               n=2, logprobs=2, echo=True, temperature=0)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.choices[0].text.startswith("The sky is") and response.choices[2].text.startswith("Grass is")
    assert all(c.logprobs is not None and len(c.logprobs.top_logprobs[-1]) == 2 for c in response.choices)
    assert response.usage.completion_tokens == 16


def test_completions_stream(pipe: GatewayPipeline) -> None:
    stream = client(pipe).completions.create(model=MODEL, prompt="Once upon a time", max_tokens=10, stream=True,
                                             stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_errors(pipe: GatewayPipeline) -> None:
    with pytest.raises(openai.AuthenticationError):
        client(pipe, key="sk-wrong").chat.completions.create(model=MODEL, messages=MESSAGES)
    with pytest.raises(openai.NotFoundError):
        client(pipe).chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError) as bad:
        client(pipe).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError) as refused:  # the engine's own refusal, through the pipeline
        client(pipe).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200_000)
    assert "exceeds the model's maximum context length" in str(refused.value)
    with pytest.raises(openai.BadRequestError) as refused_stream:  # a stream refused before its first event
        client(pipe).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=200_000, stream=True)
    assert "exceeds the model's maximum context length" in str(refused_stream.value)


async def running_requests(engine_url: str) -> int:
    async with httpx.AsyncClient() as http:
        loads = (await http.get(f"{engine_url}/v1/loads")).json()["loads"]
    return sum(d["num_running_reqs"] + d["num_waiting_reqs"] for d in loads)


async def test_client_disconnect_aborts_the_generation(pipe: GatewayPipeline) -> None:
    (engine_url,) = pipe.engines.values()
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 100_000, "stream": True, "ignore_eos": True}
    async with httpx.AsyncClient(base_url=pipe.urls[0], headers={"Authorization": f"Bearer {KEY}"},
                                 timeout=30) as http:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    rid = json.loads(line[6:])["id"].removeprefix("chatcmpl-")
                    break
            assert await running_requests(engine_url) == 1  # 100k tokens: minutes of decoding ahead
        disconnected = time.monotonic()  # leaving the block closed the connection
    while await running_requests(engine_url) and time.monotonic() - disconnected < 10:
        await asyncio.sleep(0.05)
    stopped_after = time.monotonic() - disconnected
    assert await running_requests(engine_url) == 0
    assert stopped_after < 3.0, f"the engine still ran the request {stopped_after:.1f} s after the disconnect"
    reply_topic = Topics(pipe.settings.kafka.topic_prefix).reply("g0")

    def answered(messages: dict[str, list[dict[str, Any]]]) -> bool:  # the worker still answers it
        return any(m.get("kind") != "chunk" and m["request_id"] == rid for m in messages[reply_topic])

    async with TopicReader(pipe.settings, reply_topic) as reader:
        await reader.wait_for(answered, timeout=10)
    results = [m for m in reader.messages[reply_topic] if m.get("kind") != "chunk" and m["request_id"] == rid]
    assert [(r["status"], r["error_status"], r["finish_reason"]) for r in results] == [("error", 499, "abort")]


async def test_two_gateways_each_read_only_their_own_replies(pipe: GatewayPipeline) -> None:
    async def ask(gateway: int, i: int) -> str:
        async with httpx.AsyncClient(base_url=pipe.urls[gateway], headers={"Authorization": f"Bearer {KEY}"},
                                     timeout=60) as http:
            r = await http.post("/v1/completions", json={"model": MODEL, "prompt": f"request {i} to {gateway}",
                                                         "max_tokens": 3, "stream": i % 2 == 0})
            assert r.status_code == 200, r.text
            first = r.text.split("\n")[0].removeprefix("data: ") if i % 2 == 0 else r.text
            return json.loads(first)["id"].removeprefix("cmpl-")

    asked = await asyncio.gather(*(ask(g, i) for i in range(12) for g in (0, 1)))
    mine = {0: set(asked[0::2]), 1: set(asked[1::2])}
    topics = Topics(pipe.settings.kafka.topic_prefix)
    replies = [topics.reply("g0"), topics.reply("g1")]

    def all_answered(messages: dict[str, list[dict[str, Any]]]) -> bool:
        return all(mine[g] <= {m["request_id"] for m in messages[replies[g]]} for g in (0, 1))

    async with TopicReader(pipe.settings, *replies) as reader:
        await reader.wait_for(all_answered, timeout=30)
        await reader.poll(1.0)
    for gateway in (0, 1):
        seen = {m["request_id"] for m in reader.messages[replies[gateway]]}
        assert mine[gateway] <= seen and not (seen & mine[1 - gateway])
        metrics = httpx.get(f"{pipe.urls[gateway]}/metrics").text
        assert f'lodestar_gateway_inflight{{gateway="g{gateway}"}} 0.0' in metrics


async def test_plain_kafka_clients_stream_too(pipe: GatewayPipeline) -> None:
    """A producer that is not Lodestar's client: an InferenceRequest with `stream` and its own reply topic."""
    settings = pipe.settings
    topics = Topics(settings.kafka.topic_prefix)
    reply_topic = topics.reply(f"kcat-{uuid.uuid4().hex[:6]}")
    await ensure_topics(settings, {reply_topic: 1})
    consumer = make_consumer(settings, reply_topic, group_id=None, client_id="plain-stream-test")
    producer = make_producer(settings, client_id="plain-stream-test", enable_idempotence=False, acks=1)
    await consumer.start()
    await producer.start()
    try:
        payload: dict[str, Any] = {"schema_version": 1, "request_id": "plain-stream-1", "prompt": "Tell me a story",
                                   "sampling": {"max_new_tokens": 12}, "stream": True, "reply_to": reply_topic}
        await producer.send_and_wait(topics.requests, json.dumps(payload).encode(), key=b"plain-stream-1")
        chunks: list[dict[str, Any]] = []
        result: dict[str, Any] | None = None
        async with asyncio.timeout(60):
            while result is None:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    for record in records:
                        message = json.loads(record.value)
                        if message.get("kind") == "chunk":
                            chunks.append(message)
                        else:
                            result = message
    finally:
        await producer.stop()
        await consumer.stop()
    assert result["status"] == "ok" and result["completion_tokens"] == 12
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == result["text"]
    assert chunks[-1]["completion_tokens"] == 12


async def test_the_client_library_streams(pipe: GatewayPipeline) -> None:
    topics = Topics(pipe.settings.kafka.topic_prefix)
    async with LodestarClient(pipe.settings, reply_topic=topics.reply(f"lib-{uuid.uuid4().hex[:6]}")) as lodestar:
        request = InferenceRequest(prompt="Tell me a story", sampling=SamplingParams(max_new_tokens=10))
        async with lodestar.stream(request, timeout_s=60) as reply:
            pieces = [piece async for piece in reply]
        assert len(pieces) >= 2 and "".join(pieces) == reply.result.text
        assert reply.result.completion_tokens == 10


async def test_the_demo_drives_its_traffic_through_a_gateway(pipe: GatewayPipeline) -> None:
    """`lodestar up --gateway` (app.gateway_traffic): a request as the client library would send it, streamed
    through the gateway and read back as an InferenceResult with the pipeline's id; a refused key is a rejection."""
    request = InferenceRequest(prompt="Tell me a story", session_id="demo-s1",
                               sampling=SamplingParams(max_new_tokens=8))
    ids: list[str] = []
    async with GatewayTraffic(pipe.urls[0], KEY, MODEL) as traffic:
        traffic.on_request_id = ids.append
        result = await traffic.request(request, timeout_s=60)
    assert (result.status, result.request_id, result.completion_tokens) == ("ok", request.request_id, 8)
    assert result.worker_id and result.ttft_ms is not None and 0 < result.ttft_ms <= result.e2e_ms
    assert result.prompt_tokens > 0 and result.finish_reason == "length"
    assert len(ids) == 1 and ids[0]  # the gateway's id of the request in the pipeline
    async with GatewayTraffic(pipe.urls[0], "sk-not-a-key", MODEL) as refused:
        rejected = await refused.request(request, timeout_s=60)
    assert (rejected.status, rejected.error_status) == ("rejected", 401)
