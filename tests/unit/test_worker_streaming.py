"""The worker's streaming path without Kafka: the engine call each request makes, what the worker reads from
each API's stream, and the chunks it publishes (workers/engine_api.py, workers/streaming.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from lodestar.schemas import (
    MAX_CHUNK_DATA_CHARS,
    ChatMessage,
    EngineApi,
    InferenceRequest,
    SamplingParams,
    StreamChunk,
)
from workers.engine_api import StreamCollector, engine_call
from workers.sglang_client import EngineRejected, EngineUnavailable, RetryPolicy, SGLangClient, StreamMeter
from workers.streaming import ChunkPublisher, serve_streamed


def chat_request(**api: Any) -> InferenceRequest:
    return InferenceRequest(messages=[ChatMessage(role="user", content="Hi")], sampling=SamplingParams(
        max_new_tokens=32, temperature=0.0, stop=["\n"]), api=EngineApi(kind="chat", **api), stream=True)


def test_engine_call_per_api():
    call = engine_call(chat_request(max_tokens=16, n=2, logprobs=True, top_logprobs=3, cache_salt="s",
                                    stop_regex=["a+"], seed=7))
    assert call.path == "/v1/chat/completions"
    body = call.body
    assert body["messages"] == [{"role": "user", "content": "Hi"}] and body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}  # the worker counts tokens from usage
    assert (body["max_tokens"], body["n"], body["logprobs"], body["top_logprobs"]) == (16, 2, True, 3)
    assert (body["stop"], body["stop_regex"], body["seed"], body["cache_salt"]) == (["\n"], "a+", 7, "s")
    assert "rid" in body and "max_new_tokens" not in body
    assert "max_tokens" not in engine_call(chat_request()).body  # none given: the engine's default

    completion = engine_call(InferenceRequest(input_ids=[1, 2, 3], api=EngineApi(
        kind="completions", max_tokens=4, logprobs=True, top_logprobs=0, echo=True)))
    assert completion.path == "/v1/completions"
    assert (completion.body["prompt"], completion.body["logprobs"], completion.body["echo"]) == ([1, 2, 3], 0, True)

    native = engine_call(InferenceRequest(prompt="x", api=EngineApi(
        kind="generate", max_tokens=0, logprobs=True, top_logprobs=5, logprob_start_len=0, min_tokens=0)))
    assert native.path == "/generate"
    assert native.body["sampling_params"]["max_new_tokens"] == 0 and native.body["text"] == "x"
    assert (native.body["return_logprob"], native.body["top_logprobs_num"], native.body["logprob_start_len"]) == (
        True, 5, 0)

    plain = engine_call(InferenceRequest(prompt="x", stream=True))  # a plain request that streams: /generate
    assert plain.path == "/generate" and plain.body["sampling_params"]["max_new_tokens"] == 128


def chat_event(index: int, content: str | None, finish: str | None = None, logprobs: Any = None) -> dict[str, Any]:
    return {"id": "e", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": index, "delta": {"role": None, "content": content}, "logprobs": logprobs,
                         "finish_reason": finish, "matched_stop": None}], "usage": None}


def test_chat_stream_collects_into_the_engines_response():
    c = StreamCollector("chat", n=2)
    lp = {"content": [{"token": " a", "logprob": -0.1, "bytes": [32, 97], "top_logprobs": []}]}
    outputs = [c.observe(chat_event(0, "")), c.observe(chat_event(0, " a", logprobs=lp)),
               c.observe(chat_event(1, " b")), c.observe(chat_event(0, " c", logprobs=lp)),
               c.observe(chat_event(0, None, "length")), c.observe(chat_event(1, None, "stop")),
               c.observe({"id": "e", "choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3,
                                                              "prompt_tokens_details": {"cached_tokens": 4}}})]
    assert outputs == [False, True, True, True, False, False, False]  # the role chunk is not output
    body = c.body()
    assert body["object"] == "chat.completion" and [ch["index"] for ch in body["choices"]] == [0, 1]
    first = body["choices"][0]
    assert first["message"]["content"] == " a c" and first["finish_reason"] == "length"
    assert len(first["logprobs"]["content"]) == 2
    assert (c.prompt_tokens, c.cached_tokens, c.completion_tokens, c.text) == (9, 4, 3, " a c")


def test_completions_stream_concatenates_logprob_lists():
    c = StreamCollector("completions")
    for text, tokens in (("Hi", ["H", "i"]), (" there", [" there"])):
        c.observe({"id": "e", "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": {
            "tokens": tokens, "token_logprobs": [-1.0] * len(tokens), "top_logprobs": [None] * len(tokens),
            "text_offset": [-1] * len(tokens)}}]})
    choice = c.body()["choices"][0]
    assert choice["text"] == "Hi there" and choice["logprobs"]["tokens"] == ["H", "i", " there"]


def test_native_stream_keeps_each_samples_last_cumulative_output():
    c = StreamCollector("generate", n=2)
    def ev(i: int, text: str, done: int) -> dict[str, Any]:
        return {"text": text, "index": i, "meta_info": {"prompt_tokens": 5, "cached_tokens": 1,
                                                        "completion_tokens": done, "finish_reason": None}}
    assert c.observe(ev(0, " a", 1)) and c.observe(ev(1, " a", 1)) and c.observe(ev(0, " a b", 2))
    body = c.body()
    assert [b["text"] for b in body] == [" a b", " a"] and all("index" not in b for b in body)
    assert (c.prompt_tokens, c.completion_tokens) == (5, 3)
    single = StreamCollector("generate")
    single.observe(ev(0, " x", 1))
    assert single.body()["text"] == " x"  # one sample: the object itself, as SGLang answers


class FakeProducer:
    """Records sends; each returns a future, acknowledged at once, or by `ack()` when `hold`."""

    def __init__(self, hold: bool = False) -> None:
        self.sent: list[StreamChunk] = []
        self.partitions: list[int | None] = []
        self.hold = hold
        self._unacked: list[asyncio.Future[None]] = []

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1, 2}

    async def send(self, topic: str, value: bytes, key: bytes, partition: int | None = None,
                   headers: Any = None) -> asyncio.Future[None]:
        self.sent.append(StreamChunk.model_validate_json(value))
        self.partitions.append(partition)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.hold:
            self._unacked.append(fut)
        else:
            fut.set_result(None)
        return fut

    def ack(self) -> None:
        for fut in self._unacked:
            fut.set_result(None)
        self._unacked.clear()


async def test_output_that_comes_while_a_chunk_is_unacknowledged_goes_out_together():
    producer = FakeProducer(hold=True)
    chunks = ChunkPublisher(producer, "t", "r1", "w1", [])  # type: ignore[arg-type]
    await chunks.data('{"e":1}')  # out at once: the first token is never held
    await chunks.data('{"e":2}')
    await chunks.data('{"e":3}')
    assert [c.data for c in producer.sent] == ['{"e":1}']
    producer.ack()
    for _ in range(5):  # the waiting send wakes on the acknowledgement
        await asyncio.sleep(0)
    assert [c.data for c in producer.sent] == ['{"e":1}', '{"e":2}\n{"e":3}']
    producer.ack()
    await chunks.data('{"e":4}')  # the stream's previous chunk is acknowledged: out at once
    assert producer.sent[-1].data == '{"e":4}' and producer.sent[-1].seq == 2
    producer.hold = False
    producer.ack()
    await chunks.flush()
    assert len(set(producer.partitions)) == 1  # every chunk on one partition: the key's, as the result's

    text = ChunkPublisher(FakeProducer(hold=True), "t", "r2", "w1", [])  # type: ignore[arg-type]
    for n, piece in enumerate((" a", " b", " c"), 1):
        await text.text(piece, n)
    text._producer.hold = False  # type: ignore[attr-defined]
    text._producer.ack()  # type: ignore[attr-defined]
    await text.flush()
    assert [(c.text, c.completion_tokens) for c in text._producer.sent] == [(" a", 1), (" b c", 3)]  # type: ignore[attr-defined]


async def test_long_data_is_split_into_fragments():
    producer = FakeProducer()
    chunks = ChunkPublisher(producer, "t", "r1", "w1", [])  # type: ignore[arg-type]
    raw = "x" * (2 * MAX_CHUNK_DATA_CHARS + 5)
    await chunks.data(raw)
    await chunks.data("{}")
    await chunks.flush()
    assert [c.seq for c in producer.sent] == [0, 1, 2, 3] and [c.more for c in producer.sent] == [
        True, True, False, False]
    assert "".join(c.data for c in producer.sent[:3]) == raw
    assert len({c.serve_id for c in producer.sent}) == 1


def engine(handler: Any, attempts: int = 2) -> SGLangClient:
    async def no_sleep(_: float) -> None:
        return None
    return SGLangClient("http://engine", request_timeout_s=5, retry=RetryPolicy(attempts, 0.01),
                        transport=httpx.MockTransport(handler), sleep=no_sleep)


def sse(*events: dict[str, Any]) -> bytes:
    return ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()


async def test_serve_streamed_forwards_events_or_the_whole_body():
    events = [chat_event(0, ""), chat_event(0, " a"), chat_event(0, None, "stop"),
              {"id": "e", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1}}]
    seen: list[dict[str, Any]] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(json.loads(req.content))
        return httpx.Response(200, content=sse(*events))

    for stream in (True, False):
        producer = FakeProducer()
        chunks = ChunkPublisher(producer, "t", "r1", "w1", [])  # type: ignore[arg-type]
        request = chat_request().model_copy(update={"stream": stream})
        gen = await serve_streamed(engine(handler), request, chunks, StreamMeter())
        await chunks.flush()
        assert gen.text == " a" and gen.completion_tokens == 1 and gen.ttft_ms is not None
        if stream:
            assert [json.loads(c.data) for c in producer.sent] == events
        else:
            (only,) = producer.sent
            assert json.loads(only.data)["choices"][0]["message"]["content"] == " a"
    assert seen[0]["messages"] == [{"role": "user", "content": "Hi"}]


async def test_plain_streamed_request_sends_text_deltas():
    cumulative = [{"text": t, "meta_info": {"completion_tokens": n, "prompt_tokens": 2}}
                  for n, t in enumerate([" a", " a b", " a b c"], 1)]
    producer = FakeProducer()
    chunks = ChunkPublisher(producer, "t", "r1", "w1", [])  # type: ignore[arg-type]
    gen = await serve_streamed(engine(lambda _: httpx.Response(200, content=sse(*cumulative))),
                               InferenceRequest(prompt="x", stream=True), chunks, StreamMeter())
    assert [c.text for c in producer.sent] == [" a", " b", " c"] and gen.text == " a b c"
    assert [c.completion_tokens for c in producer.sent] == [1, 2, 3]


async def test_engine_errors_keep_the_engines_words_and_status():
    def refuse(_: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"object": "error", "message": "The input is longer than the model's "
                                          "context length", "code": 400})

    chunks = ChunkPublisher(FakeProducer(), "t", "r1", "w1", [])  # type: ignore[arg-type]
    with pytest.raises(EngineRejected) as err:
        await serve_streamed(engine(refuse), chat_request(), chunks, StreamMeter())
    assert str(err.value) == "The input is longer than the model's context length" and err.value.status == 400

    calls = []

    def busy_in_stream(_: httpx.Request) -> httpx.Response:  # a full queue, reported inside the stream
        calls.append(1)
        return httpx.Response(200, content=sse({"error": {"message": "queue full", "code": 503}}))

    with pytest.raises(EngineUnavailable, match="queue full"):
        await serve_streamed(engine(busy_in_stream), chat_request(), chunks, StreamMeter())
    assert len(calls) == 3  # retried: nothing had been forwarded
