"""API conformance of the emulator with SGLang 0.5.x: native and OpenAI routes, framing, errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from sim.emulator.emulator import Emulator, EmulatorConfig
from sim.emulator.server import create_app

FAST = 0.02  # wall seconds per emulated second: tests run 50x faster than the modelled GPU
WORDS = " ".join(f"word{i}" for i in range(300))


@pytest.fixture
async def api() -> AsyncIterator[tuple[Emulator, httpx.AsyncClient]]:
    emu = Emulator(EmulatorConfig(gpu="H100", time_scale=FAST))
    app = create_app(emu)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://emu") as client:
            yield emu, client


def sse_events(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, checking the `data: ...\\n\\n` framing."""
    assert body.endswith("\n\n")
    events = body[:-2].split("\n\n")
    assert all(e.startswith("data: ") for e in events), events
    return [e[len("data: "):] for e in events]


async def test_generate_non_streaming_shape(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    emu, client = api
    r = await client.post("/generate", json={"text": WORDS, "sampling_params": {"max_new_tokens": 5}})
    assert r.status_code == 200
    out = r.json()
    assert set(out) == {"text", "output_ids", "meta_info"}
    meta = out["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"} <= set(meta)
    assert meta["prompt_tokens"] == 301 and meta["completion_tokens"] == 5
    assert meta["finish_reason"] == {"type": "length", "length": 5}
    assert out["text"] == " tok0 tok1 tok2 tok3 tok4"
    assert out["output_ids"] == emu.tokenizer.filler_ids(5)
    assert meta["e2e_latency"] > 0


async def test_generate_stream_is_cumulative_and_ends_with_done(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    r = await client.post("/generate", json={"input_ids": list(range(1, 200)), "stream": True,
                                             "sampling_params": {"max_new_tokens": 6}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks and chunks[0]["text"]
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert after["text"].startswith(before["text"])
        assert after["output_ids"][: len(before["output_ids"])] == before["output_ids"]
        assert before["meta_info"]["finish_reason"] is None
    last = chunks[-1]["meta_info"]
    assert last["finish_reason"]["type"] == "length" and last["completion_tokens"] == 6
    assert last["prompt_tokens"] == 199 and "e2e_latency" in last


async def test_stop_string_finishes_with_stop(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    params = {"max_new_tokens": 50, "stop": [" tok3"]}
    r = await client.post("/generate", json={"text": "hi", "sampling_params": params})
    out = r.json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": " tok3"}
    assert out["text"] == " tok0 tok1 tok2" and out["meta_info"]["completion_tokens"] == 4


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"sampling_params": {"max_new_tokens": 4}}, "Either text, input_ids or input_embeds should be provided."),
        ({"text": "hi", "sampling_params": {"temperature": -1}}, "temperature must be non-negative"),
        ({"text": "hi", "sampling_params": {"max_new_tokens": 200_000}}, "Requested token count exceeds"),
        ({"input_ids": [1] * 140_000}, "is longer than the model's context length (131072 tokens)"),
    ],
)
async def test_generate_bad_requests(
    api: tuple[Emulator, httpx.AsyncClient], body: dict[str, Any], message: str
) -> None:
    _, client = api
    r = await client.post("/generate", json=body)
    assert r.status_code == 400
    assert message in r.json()["error"]["message"]
    streamed = await client.post("/generate", json={**body, "stream": True})
    assert streamed.status_code == 200  # SGLang reports stream errors in-band
    events = sse_events(streamed.text)
    assert events[-1] == "[DONE]" and message in json.loads(events[0])["error"]["message"]


async def test_malformed_body_is_an_error_response(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    r = await client.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400
    assert r.json()["object"] == "error" and r.json()["code"] == 400
    missing = await client.get("/no/such/route")
    assert missing.status_code == 404 and missing.json()["code"] == 404


async def test_full_queue_is_rejected_as_sglang_does() -> None:
    emu = Emulator(EmulatorConfig(gpu="H100", time_scale=FAST, max_queued_requests=2))
    app = create_app(emu)  # lifespan not started: nothing leaves the waiting queue
    for i in range(2):
        emu.submit(f"filler-{i}", emu.prepare("hello there", None, {"max_new_tokens": 4}))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://emu") as client:
        r = await client.post("/generate", json={"text": "one more"})
        assert r.status_code == 503
        assert r.json() == {"object": "error", "message": "The request queue is full.", "type": "503",
                            "param": None, "code": 503}
        s = await client.post("/generate", json={"text": "one more", "stream": True})
        events = sse_events(s.text)
        reason = json.loads(events[0])["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and reason["status_code"] == 503 and events[-1] == "[DONE]"
        chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert chat.status_code == 503 and chat.json()["message"] == "The request queue is full."
        chat_s = await client.post("/v1/chat/completions",
                                   json={"messages": [{"role": "user", "content": "x"}], "stream": True})
        events = sse_events(chat_s.text)
        assert json.loads(events[0])["error"]["code"] == 503 and events[-1] == "[DONE]"
    await emu.runner.stop()


async def test_completions_non_streaming_and_usage(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    r = await client.post("/v1/completions", json={"model": "m", "prompt": WORDS, "max_tokens": 3})
    assert r.status_code == 200
    out = r.json()
    assert out["object"] == "text_completion" and out["id"].startswith("cmpl-") and out["model"] == "m"
    choice = out["choices"][0]
    assert choice["text"] == " tok0 tok1 tok2" and choice["finish_reason"] == "length"
    assert out["usage"]["prompt_tokens"] == 301 and out["usage"]["completion_tokens"] == 3
    assert out["usage"]["total_tokens"] == 304


async def test_completions_stream_deltas_and_usage_chunk(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    r = await client.post("/v1/completions", json={
        "prompt": WORDS, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == " tok0 tok1 tok2 tok3 tok4"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


async def test_chat_stream_role_content_finish_usage(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    body = {"messages": [{"role": "user", "content": WORDS}], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    events = sse_events((await client.post("/v1/chat/completions", json=body)).text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"].startswith("chatcmpl-") for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = "".join(c["choices"][0]["delta"]["content"] or "" for c in chunks[1:-1])
    assert content == " tok0 tok1 tok2 tok3"
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4


async def test_chat_non_streaming_and_errors(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 2})
    out = r.json()
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": " tok0 tok1",
                                            "reasoning_content": None, "tool_calls": None}
    empty = await client.post("/v1/chat/completions", json={"messages": []})
    assert empty.status_code == 400 and empty.json()["object"] == "error"
    bad = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert bad.status_code == 400 and "max_tokens must be positive" in bad.json()["message"]
    noprompt = await client.post("/v1/completions", json={"max_tokens": 3})
    assert noprompt.status_code == 400
    form = await client.post("/v1/completions", content=b'{"prompt": "x"}', headers={"content-type": "text/plain"})
    assert form.status_code == 400 and "application/json" in form.json()["message"]


async def test_repeated_prompt_reports_cached_tokens(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    first = (await client.post("/generate", json={"text": WORDS, "sampling_params": {"max_new_tokens": 2}})).json()
    second = (await client.post("/generate", json={"text": WORDS, "sampling_params": {"max_new_tokens": 2}})).json()
    assert first["meta_info"]["cached_tokens"] == 0
    assert 0 < second["meta_info"]["cached_tokens"] <= second["meta_info"]["prompt_tokens"] - 1
    chat = {"messages": [{"role": "user", "content": WORDS}], "max_tokens": 2}
    await client.post("/v1/chat/completions", json=chat)
    usage = (await client.post("/v1/chat/completions", json=chat)).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0


async def test_info_endpoints(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    emu, client = api
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/health_generate")).status_code == 200
    for path in ("/server_info", "/get_server_info"):
        info = (await client.get(path)).json()
        assert info["max_total_num_tokens"] == emu.engine.max_kv_tokens and info["version"]
        assert info["model_path"] == "meta-llama/Llama-3.1-8B-Instruct"
    for path in ("/model_info", "/get_model_info"):
        assert (await client.get(path)).json()["is_generation"] is True
    models = (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert models["data"][0]["max_model_len"] == 131072
    loads = (await client.get("/v1/loads")).json()
    assert loads["dp_rank_count"] == 1 and loads["aggregate"]["total_reqs"] == 0
    rank = loads["loads"][0]
    for key in ("num_running_reqs", "num_waiting_reqs", "num_used_tokens", "max_total_num_tokens",
                "token_usage", "gen_throughput", "cache_hit_rate", "memory", "queues"):
        assert key in rank
    assert "memory" not in (await client.get("/v1/loads?include=core")).json()["loads"][0]
    assert (await client.get("/v1/loads?include=nonsense")).status_code == 400
    assert "sglang_num_running_reqs" in (await client.get("/v1/loads?format=prometheus")).text
    assert (await client.get("/get_load")).json()[0].keys() == {"dp_rank", "num_reqs", "num_waiting_reqs",
                                                                 "num_tokens"}
    assert (await client.post("/flush_cache")).status_code == 200


async def test_metrics_expose_sglang_series(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    await client.post("/generate", json={"text": WORDS, "sampling_params": {"max_new_tokens": 3}})
    text = (await client.get("/metrics")).text
    samples = {s.name: s for f in text_string_to_metric_families(text) for s in f.samples}
    for name in ("sglang:num_running_reqs", "sglang:num_queue_reqs", "sglang:token_usage",
                 "sglang:cache_hit_rate", "sglang:gen_throughput", "sglang:num_used_tokens",
                 "sglang:time_to_first_token_seconds_count", "sglang:e2e_request_latency_seconds_count",
                 "sglang:inter_token_latency_seconds_count"):
        assert name in samples, name
    assert samples["sglang:prompt_tokens_total"].value == 301
    assert samples["sglang:generation_tokens_total"].value == 3
    assert samples["sglang:time_to_first_token_seconds_count"].value == 1
    assert samples["sglang:num_running_reqs"].labels["model_name"] == "meta-llama/Llama-3.1-8B-Instruct"


async def test_abort_request_endpoint(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    emu, client = api
    pending = asyncio.create_task(client.post("/generate", json={
        "rid": "long-one", "text": "hi", "sampling_params": {"max_new_tokens": 100_000}}))
    while "long-one" not in emu.runner.states:
        await asyncio.sleep(0.001)
    assert (await client.post("/abort_request", json={"rid": "long-one"})).status_code == 200
    out = (await pending).json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert not emu.engine.has_work()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"text": "hi", "return_logprob": True, "top_logprobs_num": 21}, "top_logprobs_num must be an integer in"),
        ({"text": "hi", "return_logprob": True, "logprob_start_len": 5}, "logprob_start_len (5) must be smaller"),
        ({"text": "hi", "return_logprob": True, "token_ids_logprob": [1] * 129}, "token_ids_logprob must be a list"),
        ({"text": ["a"] * 1025}, "at most 1024 prompts"),
        ({"text": ["a"] * 33, "sampling_params": {"n": 128}}, "at most 1024 prompts and 4096 samples"),
        ({"text": ["a", "b"], "rid": "one"}, "The rid should be a list for batch processing."),
        ({"text": ["a", "b"], "rid": ["one"]}, "rid has 1 entries for 2 prompts"),
        ({"text": ["a", "b"], "sampling_params": [{"n": 1}, {"n": 2}]}, "must ask for the same n"),
        ({"text": "hi", "sampling_params": {"stop_regex": "(x"}}, "is not a valid regular expression"),
    ],
)
async def test_generate_rejects_unbounded_or_malformed_requests(
    api: tuple[Emulator, httpx.AsyncClient], body: dict[str, Any], message: str
) -> None:
    _, client = api
    r = await client.post("/generate", json=body)
    assert r.status_code == 400 and message in r.json()["error"]["message"]


async def test_batch_with_rids_and_per_prompt_params(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api
    r = await client.post("/generate", json={
        "text": ["first prompt", "second prompt"], "rid": ["a", "b"],
        "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 3}]})
    out = r.json()
    assert [o["meta_info"]["id"] for o in out] == ["a", "b"]
    assert [o["meta_info"]["completion_tokens"] for o in out] == [2, 3]


async def test_cache_salt_keeps_prefixes_apart(api: tuple[Emulator, httpx.AsyncClient]) -> None:
    _, client = api

    async def cached(salt: str | None) -> int:
        body = {"text": WORDS, "sampling_params": {"max_new_tokens": 1}, **({"cache_salt": salt} if salt else {})}
        return (await client.post("/generate", json=body)).json()["meta_info"]["cached_tokens"]

    assert await cached(None) == 0
    assert await cached("tenant") == 0  # the unsalted run's cache is not shared
    assert await cached("tenant") == 300 and await cached(None) == 300


async def test_api_key_guards_every_route_but_health_and_metrics() -> None:
    emu = Emulator(EmulatorConfig(gpu="H100", time_scale=FAST, api_key="secret"))
    app = create_app(emu)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://emu") as client:
        assert (await client.get("/v1/models")).status_code == 401
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer wrong"})).json() == {
            "error": "Unauthorized"}
        assert (await client.get("/v1/models", headers={"Authorization": "Bearer secret"})).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


async def test_body_without_content_length_is_bounded_too() -> None:
    emu = Emulator(EmulatorConfig(gpu="H100", time_scale=FAST, max_payload_size=100))
    app = create_app(emu)

    async def chunked() -> AsyncIterator[bytes]:
        yield b'{"text": "'
        yield b"x" * 200
        yield b'"}'

    async with app.router.lifespan_context(app), httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://emu") as client:
        r = await client.post("/generate", content=chunked())
        assert r.status_code == 413 and "Payload Too Large" in r.json()["message"]
        assert (await client.post("/generate", json={"text": "short"})).status_code == 200



async def test_stored_responses_are_bounded_by_count_and_size(api: tuple[Emulator, httpx.AsyncClient],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from sim.emulator import openai_responses

    monkeypatch.setattr(openai_responses, "MAX_STORED_RESPONSES", 2)
    _, client = api
    ids = []
    for i in range(3):
        r = await client.post("/v1/responses", json={"input": f"question {i}", "max_output_tokens": 2})
        ids.append(r.json()["id"])
    assert (await client.get(f"/v1/responses/{ids[0]}")).status_code == 404  # the oldest went
    assert (await client.get(f"/v1/responses/{ids[2]}")).json()["output"][0]["content"][0]["text"] == " tok0 tok1"
    gone = await client.post("/v1/responses", json={"input": "more", "previous_response_id": ids[0]})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "previous_response_id"
    monkeypatch.setattr(openai_responses, "MAX_STORED_CHARS", 10)
    big = await client.post("/v1/responses", json={"input": "x " * 100, "max_output_tokens": 1})
    assert (await client.get(f"/v1/responses/{big.json()['id']}")).status_code == 404  # over the size bound


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"query": "q", "items": ["a"], "label_token_ids": []}, "label_token_ids must be a list of 1 to 128"),
        ({"query": "q", "items": [[1, 2]], "label_token_ids": [5]}, "both be text or both be token ids"),
        ({"items": ["a"], "label_token_ids": [5]}, "query and items are required"),
    ],
)
async def test_score_rejects_malformed_requests(api: tuple[Emulator, httpx.AsyncClient], body: dict[str, Any],
                                                message: str) -> None:
    _, client = api
    r = await client.post("/v1/score", json=body)
    assert r.status_code == 400 and message in r.json()["message"] and r.json()["type"] == "BadRequestError"
