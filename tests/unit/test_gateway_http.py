"""The gateway's HTTP layer on a scripted in-memory pipeline: request mapping, OpenAI-shaped errors, SSE framing,
batches, API keys, rate limits, saturation, deadlines (gateway/). The real pipeline is in
tests/integration/test_gateway.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from gateway.auth import ApiKeys, key_digest
from gateway.http import create_app
from gateway.service import GatewayService, check_limits
from lodestar.client import Reply
from lodestar.schemas import InferenceRequest, InferenceResult, StreamChunk
from lodestar.settings import ConfigurationError, Settings

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
KEY = "sk-test-123"

Script = Callable[[InferenceRequest], list[StreamChunk | InferenceResult]]


class FakeRedis:
    """What the gateway asks of Redis: its rate-limit script (allowing or not) and abort keys."""

    def __init__(self) -> None:
        self.allow = True
        self.keys: dict[str, str] = {}

    def register_script(self, _: str) -> Callable[..., Any]:
        async def run(keys: list[str], args: list[Any]) -> list[int]:
            return [1, 0] if self.allow else [0, 1500]
        return run

    async def set(self, key: str, value: str, ex: int | None = None) -> None:
        self.keys[key] = value


class FakePipeline:
    """Stands for Kafka and the workers: answers each sent request with its script's messages."""

    def __init__(self, script: Script, delay_s: float = 0.0):
        self.script = script
        self.delay_s = delay_s
        self.sent: list[InferenceRequest] = []

    async def send(self, request: InferenceRequest, max_reply_chars: int = 10**9) -> Reply:
        self.sent.append(request)
        reply = Reply(request.request_id, max_reply_chars)

        async def answer() -> None:
            for message in self.script(request):
                await asyncio.sleep(self.delay_s)
                if isinstance(message, StreamChunk):
                    reply._chunk(message)
                else:
                    reply._result(message)

        asyncio.get_running_loop().create_task(answer())
        return reply


def data_chunks(request: InferenceRequest, events: list[Any], serve: str = "s1", start: int = 0) -> list[StreamChunk]:
    return [StreamChunk(request_id=request.request_id, worker_id="w1", serve_id=serve, seq=start + i,
                        data=e if isinstance(e, str) else json.dumps(e)) for i, e in enumerate(events)]


def ok(request: InferenceRequest) -> InferenceResult:
    return InferenceResult(request_id=request.request_id, worker_id="w1", status="ok")


def chat_events(texts: list[str], n: int = 1, usage: bool = True) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i in range(n):
        out.append({"id": "engine-id", "object": "chat.completion.chunk", "created": 1, "model": "engine-model",
                    "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}}]})
        out += [{"id": "engine-id", "object": "chat.completion.chunk", "created": 1, "model": "engine-model",
                 "choices": [{"index": i, "delta": {"content": t}, "finish_reason": None}]} for t in texts]
    if usage:
        out.append({"id": "engine-id", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": len(texts) * n,
                                                                "total_tokens": 5 + len(texts) * n}})
    return out


def chat_script(request: InferenceRequest) -> list[StreamChunk | InferenceResult]:
    if request.stream:
        return [*data_chunks(request, chat_events([" Paris", "."])), ok(request)]
    body = {"id": "engine-id", "object": "chat.completion", "created": 1, "model": "engine-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": " Paris."}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}}
    return [*data_chunks(request, [body]), ok(request)]


def completion_script(request: InferenceRequest) -> list[StreamChunk | InferenceResult]:
    n = request.api.n if request.api else 1
    text = f" {request.prompt}!"
    if request.stream:
        events = [{"id": "e", "object": "text_completion", "created": 1, "model": "m",
                   "choices": [{"index": i, "text": text, "finish_reason": "length"}]} for i in range(n)]
        events.append({"id": "e", "choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": n,
                                                           "total_tokens": 2 + n}})
        return [*data_chunks(request, events), ok(request)]
    body = {"id": "e", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": i, "text": text, "finish_reason": "length"} for i in range(n)],
            "usage": {"prompt_tokens": 2, "completion_tokens": n, "total_tokens": 2 + n,
                      "prompt_tokens_details": {"cached_tokens": 1}}}
    return [*data_chunks(request, [body]), ok(request)]


def make_service(script: Script = chat_script, delay_s: float = 0.0, **gateway: Any
                 ) -> tuple[GatewayService, FakePipeline, FakeRedis]:
    settings = Settings(gateway={"api_key_hashes": [key_digest(KEY)], "model_name": MODEL, **gateway})
    redis = FakeRedis()
    service = GatewayService(settings, redis=redis)  # type: ignore[arg-type]
    pipeline = FakePipeline(script, delay_s)
    service.client.send = pipeline.send  # type: ignore[method-assign]
    return service, pipeline, redis


@pytest.fixture
async def http() -> AsyncIterator[Callable[[GatewayService], httpx.AsyncClient]]:
    clients: list[httpx.AsyncClient] = []

    def make(service: GatewayService, key: str | None = KEY) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(service)), base_url="http://gw",
                                   headers=headers)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def sse_payloads(text: str) -> list[Any]:
    """The data of each SSE event ([DONE] as the string)."""
    assert text.endswith("\n\n")
    out = []
    for block in text.strip("\n").split("\n\n"):
        assert block.startswith("data: "), block
        data = block[6:]
        out.append(data if data == "[DONE]" else json.loads(data))
    return out


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Capital of France?"}], **extra}


# ---- mapping ---------------------------------------------------------------------------------------------

async def test_chat_becomes_one_request_with_its_messages_and_options(http):
    service, pipeline, _ = make_service()
    r = await http(service).post("/v1/chat/completions", json=chat(
        max_tokens=9, n=1, temperature=0.5, stop="\n", logprobs=True, top_logprobs=2, cache_salt="tenant-a",
        top_k=5, seed=3), headers={"x-session-id": "conv-7"})
    assert r.status_code == 200, r.text
    (sent,) = pipeline.sent
    assert sent.messages is not None and sent.messages[0].content == "Capital of France?"
    assert sent.api is not None and sent.api.kind == "chat"
    assert (sent.api.max_tokens, sent.api.logprobs, sent.api.top_logprobs, sent.api.cache_salt, sent.api.top_k,
            sent.api.seed) == (9, True, 2, "tenant-a", 5, 3)
    assert (sent.sampling.max_new_tokens, sent.sampling.temperature, sent.sampling.stop) == (9, 0.5, ["\n"])
    assert sent.reply_to == service.reply_topic and sent.session_id == "conv-7" and not sent.stream
    assert sent.deadline_ms is not None and sent.deadline_ms > sent.created_at
    assert sent.metadata == {"gateway": service.gateway_id, "api_key": key_digest(KEY)[:12]}
    body = r.json()
    assert body["id"] == f"chatcmpl-{sent.request_id}" and body["model"] == MODEL
    assert r.headers["x-request-id"] == body["id"] and r.headers["x-lodestar-worker"] == "w1"
    assert body["choices"][0]["message"]["content"] == " Paris."
    assert service.inflight == 0 and not any(k.startswith("lodestar:abort") for k in _redis_keys(service))


def _redis_keys(service: GatewayService) -> list[str]:
    return list(service._redis.keys)  # type: ignore[attr-defined]


async def test_chat_without_max_tokens_leaves_the_limit_to_the_engine(http):
    service, pipeline, _ = make_service()
    assert (await http(service).post("/v1/chat/completions", json=chat())).status_code == 200
    sent = pipeline.sent[0]
    assert sent.api is not None and sent.api.max_tokens is None and sent.sampling.max_new_tokens == 256
    assert sent.sampling.temperature == 1.0  # OpenAI's default


async def test_completion_batch_is_split_per_prompt_and_merged(http):
    service, pipeline, _ = make_service(completion_script)
    r = await http(service).post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b"], "n": 2,
                                                          "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert [s.prompt for s in pipeline.sent] == ["a", "b"]
    base = pipeline.sent[0].request_id.rsplit("-", 1)[0]
    assert [s.request_id for s in pipeline.sent] == [f"{base}-0", f"{base}-1"]
    body = r.json()
    assert [(c["index"], c["text"]) for c in body["choices"]] == [(0, " a!"), (1, " a!"), (2, " b!"), (3, " b!")]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8,
                             "prompt_tokens_details": {"cached_tokens": 2}}
    assert body["id"] == f"cmpl-{base}"


async def test_completion_batch_streams_with_indexes_across_prompts_and_one_usage(http):
    service, _, _ = make_service(completion_script)
    r = await http(service).post("/v1/completions", json={"model": MODEL, "prompt": [[1, 2], [3]], "n": 2,
                                                          "stream": True, "stream_options": {"include_usage": True}})
    events = sse_payloads(r.text)
    assert events[-1] == "[DONE]"
    usage = events[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4
    indexes = sorted(c["index"] for e in events[:-2] for c in e["choices"])
    assert indexes == [0, 1, 2, 3]


async def test_native_generate_maps_sampling_params(http):
    def script(request: InferenceRequest) -> list[Any]:
        out = {"text": " hi", "meta_info": {"prompt_tokens": 2, "completion_tokens": 1}}
        return [*data_chunks(request, [out if not request.stream else {**out, "index": 0}]), ok(request)]

    service, pipeline, _ = make_service(script)
    client = http(service)
    r = await client.post("/generate", json={"input_ids": [1, 2, 3], "sampling_params": {
        "max_new_tokens": 0, "temperature": 0, "stop_token_ids": [7], "n": 1}, "return_logprob": True,
        "top_logprobs_num": 5, "logprob_start_len": 0, "lora_path": None})
    assert r.status_code == 200, r.text
    assert r.json() == {"text": " hi", "meta_info": {"prompt_tokens": 2, "completion_tokens": 1}}
    api = pipeline.sent[0].api
    assert api is not None and (api.kind, api.max_tokens, api.top_logprobs, api.stop_token_ids) == (
        "generate", 0, 5, [7])
    r = await client.post("/generate", json={"text": ["a", "b"], "stream": True})
    events = sse_payloads(r.text)
    assert sorted(e["index"] for e in events[:-1]) == [0, 1] and events[-1] == "[DONE]"


# ---- streaming -------------------------------------------------------------------------------------------

async def test_chat_stream_is_relayed_in_order_with_one_id_and_the_asked_for_usage(http):
    service, pipeline, _ = make_service()
    client = http(service)
    r = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(r.text)
    rid = pipeline.sent[0].request_id
    assert events[-1] == "[DONE]"
    assert all(e["id"] == f"chatcmpl-{rid}" and e["model"] == MODEL for e in events[:-1])
    assert [e["choices"][0]["delta"].get("content") for e in events[:-1]] == ["", " Paris", "."]  # no usage event
    r = await client.post("/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True}))
    events = sse_payloads(r.text)
    assert events[-2]["usage"]["total_tokens"] == 7 and events[-2]["choices"] == []


async def test_a_repeated_chunk_is_not_relayed_twice(http):
    def script(request: InferenceRequest) -> list[Any]:
        events = data_chunks(request, chat_events([" a", " b"], usage=False))
        return [events[0], events[1], events[1], events[2], ok(request)]

    service, _, _ = make_service(script)
    r = await http(service).post("/v1/chat/completions", json=chat(stream=True))
    contents = [e["choices"][0]["delta"]["content"] for e in sse_payloads(r.text)[:-1]]
    assert contents == ["", " a", " b"]


async def test_a_takeover_before_any_output_is_invisible(http):
    def script(request: InferenceRequest) -> list[Any]:
        # the first worker died having sent only a fragment of its first event: a second one serves it whole
        dead = StreamChunk(request_id=request.request_id, worker_id="w0", serve_id="dead", seq=0,
                           data='{"id":"x","choi', more=True)
        return [dead, *data_chunks(request, chat_events([" new"], usage=False), serve="second"), ok(request)]

    service, _, _ = make_service(script)
    r = await http(service).post("/v1/chat/completions", json=chat(stream=True))
    contents = [e["choices"][0]["delta"]["content"] for e in sse_payloads(r.text)[:-1]]
    assert contents == ["", " new"]


async def test_a_takeover_after_output_ends_the_stream_with_an_error(http):
    def script(request: InferenceRequest) -> list[Any]:
        first = data_chunks(request, chat_events([" a"], usage=False))
        return [*first, *data_chunks(request, chat_events([" x"], usage=False), serve="second"), ok(request)]

    service, pipeline, redis = make_service(script, delay_s=0.001)
    r = await http(service).post("/v1/chat/completions", json=chat(stream=True))
    events = sse_payloads(r.text)
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "stream_interrupted" and "served again" in events[-2]["error"]["message"]
    rid = pipeline.sent[0].request_id
    assert redis.keys.get(f"lodestar:abort:{rid}") == service.gateway_id  # the second serving is stopped


async def test_an_error_after_output_is_the_last_event(http):
    def script(request: InferenceRequest) -> list[Any]:
        return [*data_chunks(request, chat_events([" a"], usage=False)), InferenceResult(
            request_id=request.request_id, worker_id="w1", status="error", error="engine timed out",
            error_status=502)]

    service, _, _ = make_service(script)
    r = await http(service).post("/v1/chat/completions", json=chat(stream=True))
    events = sse_payloads(r.text)
    assert events[-2]["error"] == {"message": "engine timed out", "type": "server_error", "param": None,
                                   "code": "engine_failed"}


# ---- errors ----------------------------------------------------------------------------------------------

def refused(status: str, error: str, error_status: int | None = None, worker: str = "w1") -> Script:
    def script(request: InferenceRequest) -> list[Any]:
        return [InferenceResult(request_id=request.request_id, worker_id=worker, status=status,  # type: ignore[arg-type]
                                error=error, error_status=error_status)]
    return script


@pytest.mark.parametrize(("script", "status", "code"), [
    (refused("rejected", "The input (1200 tokens) is longer than the model's context length", 400), 400,
     "invalid_request"),
    (refused("error", "engine unavailable after retries", 503), 503, "overloaded"),
    (refused("rejected", "no routable worker within 300 s", worker=""), 503, "no_worker"),
    (refused("error", "internal error: boom"), 500, "internal_error"),
], ids=["engine-refused", "engine-overloaded", "no-worker", "internal"])
async def test_pipeline_errors_before_output_keep_their_status(http, script, status, code):
    service, _, _ = make_service(script)
    for stream in (False, True):  # a stream's headers wait for its first event: the status is still right
        r = await http(service).post("/v1/chat/completions", json=chat(stream=stream))
        assert r.status_code == status
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["code"] == code


@pytest.mark.parametrize(("body", "param"), [
    (chat(tools=[{"type": "function"}]), "tools"),
    (chat(n=0), "n"),
    (chat(top_logprobs=21), "top_logprobs"),
    (chat(temperature="0.5"), "temperature"),  # no coercion from strings
    ({"model": MODEL}, "messages"),
    (chat(messages=[]), "messages"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages.0.content"),
    (chat(max_tokens=0), "max_tokens"),
], ids=["tools", "n", "top_logprobs", "string-number", "missing", "empty", "image", "max-tokens"])
async def test_invalid_bodies_are_400_naming_the_parameter(http, body, param):
    service, pipeline, _ = make_service()
    r = await http(service).post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"].startswith(param)
    assert not pipeline.sent


async def test_non_finite_numbers_and_broken_json_are_refused(http):
    service, _, _ = make_service()
    client = http(service)
    for raw in (b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}' % MODEL.encode(),
                b"{not json"):
        r = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text


async def test_unknown_model_is_404(http):
    service, _, _ = make_service()
    client = http(service)
    r = await client.post("/v1/chat/completions", json={**chat(), "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert (await client.get("/v1/models/gpt-9")).status_code == 404
    card = (await client.get(f"/v1/models/{MODEL}")).json()
    assert card["id"] == MODEL and card["max_model_len"] == 131_072
    assert [m["id"] for m in (await client.get("/v1/models")).json()["data"]] == [MODEL]


async def test_bodies_over_the_limit_are_413(http):
    service, pipeline, _ = make_service(max_body_bytes=2048)
    client = http(service)
    big = chat(messages=[{"role": "user", "content": "x" * 4096}])
    r = await client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and "Payload Too Large" in r.json()["error"]["message"]

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit holds as the body arrives
        yield json.dumps(big).encode()

    r = await client.post("/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and not pipeline.sent


async def test_api_keys(http):
    service, _, _ = make_service()
    for key, status in ((None, 401), ("sk-wrong", 401), (KEY, 200)):
        r = await http(service, key).post("/v1/chat/completions", json=chat())
        assert r.status_code == status
        if status == 401:
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert (await http(service, None).get("/v1/models")).status_code == 401
    for open_path in ("/health", "/healthz", "/readyz", "/metrics"):  # probes and scrapes need no key
        assert (await http(service, None).get(open_path)).status_code in (200, 503)


def test_a_gateway_without_keys_needs_dev_mode_said_out_loud():
    with pytest.raises(ValueError, match="no API key"):
        ApiKeys([], allow_anonymous=False)
    with pytest.raises(ValueError, match="not SHA-256"):
        ApiKeys(["secret"], allow_anonymous=False)
    assert ApiKeys([], allow_anonymous=True).identify({}) == "anonymous"
    keys = ApiKeys([key_digest(KEY).upper()], allow_anonymous=False)
    assert keys.identify({"authorization": f"Bearer {KEY}"}) == key_digest(KEY)[:12]


async def test_rate_limited_key_gets_429_with_retry_after(http):
    service, pipeline, redis = make_service()
    redis.allow = False
    r = await http(service).post("/v1/chat/completions", json=chat())
    assert r.status_code == 429 and r.headers["retry-after"] == "2"
    assert r.json()["error"]["type"] == "rate_limit_error" and not pipeline.sent


async def test_saturation_is_429_and_no_worker_503(http):
    service, pipeline, _ = make_service(max_waiting_per_worker=8, max_in_flight=2)
    client = http(service)
    service.routable_workers, service.waiting_per_worker = 2, 9.0
    r = await client.post("/v1/chat/completions", json=chat())
    assert r.status_code == 429 and r.json()["error"]["code"] == "saturated"
    service.routable_workers, service.waiting_per_worker = 0, 0.0
    assert (await client.post("/v1/chat/completions", json=chat())).status_code == 503
    service.routable_workers = 2
    r = await client.post("/v1/completions", json={"model": MODEL, "prompt": ["a", "b", "c"]})
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests"  # 3 requests > 2 in flight
    assert not pipeline.sent


async def test_deadline_is_504_and_aborts_the_request(http):
    service, pipeline, redis = make_service(lambda request: [], request_timeout_s=0.2)
    r = await http(service).post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    assert f"lodestar:abort:{pipeline.sent[0].request_id}" in redis.keys
    assert service.inflight == 0


async def test_metrics_count_requests_by_route_and_code(http):
    service, _, _ = make_service()
    client = http(service)
    await client.post("/v1/chat/completions", json=chat())
    await client.post("/v1/chat/completions", json=chat(n=0))
    text = (await client.get("/metrics")).text
    assert 'lodestar_gateway_requests_total{code="200",gateway="' in text
    assert 'code="400"' in text and "lodestar_gateway_ttft_seconds_bucket" in text


def test_a_gateway_refuses_settings_under_which_every_request_would_be_refused() -> None:
    check_limits(Settings(), "lodestar.reply.g1")
    with pytest.raises(ConfigurationError, match="limits.reply_to_pattern"):
        check_limits(Settings(limits={"reply_to_pattern": "{prefix}results"}), "lodestar.reply.g1")
    with pytest.raises(ConfigurationError, match="gateway.max_body_bytes"):
        check_limits(Settings(gateway={"max_body_bytes": 1_000_000}), "lodestar.reply.g1")
