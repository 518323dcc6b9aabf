"""The SGLang client against a fake transport: SSE parsing, TTFT/TPOT/E2E, retries, load fallbacks."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from lodestar.schemas import InferenceRequest, SamplingParams
from workers.sglang_client import (
    EngineError,
    EngineRejected,
    EngineUnavailable,
    RetryPolicy,
    SGLangClient,
    StreamMeter,
    generate_payload,
    parse_get_load,
    parse_metrics,
    parse_v1_loads,
    sse_data,
)


def sse(*events: dict | str) -> bytes:
    """An SGLang-style event stream: `data: {...}` blocks, then `data: [DONE]`."""
    parts = [f"data: {json.dumps(e) if isinstance(e, dict) else e}\n\n" for e in events]
    return ("".join(parts) + "data: [DONE]\n\n").encode()


def chunk(text: str, completion: int, finish: str | None = None, prompt: int = 10, cached: int = 4) -> dict:
    return {
        "text": text,
        "meta_info": {
            "id": "x",
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": cached,
            "finish_reason": {"type": finish} if finish else None,
            "e2e_latency": 0.1,
        },
    }


class FakeClock:
    """Returns the given instants one per call, then keeps returning the last."""

    def __init__(self, *instants: float):
        self._it: Iterator[float] = iter(instants)
        self._last = instants[0]

    def __call__(self) -> float:
        self._last = next(self._it, self._last)
        return self._last


def request(**kw) -> InferenceRequest:
    return InferenceRequest(prompt=kw.pop("prompt", "hello there"), sampling=SamplingParams(max_new_tokens=8), **kw)


def client(handler, *, attempts: int = 3, clock=None, sleeps: list[float] | None = None) -> SGLangClient:
    async def record_sleep(s: float) -> None:
        if sleeps is not None:
            sleeps.append(s)

    kwargs = {"clock": clock} if clock else {}
    return SGLangClient(
        "http://engine", request_timeout_s=5.0, retry=RetryPolicy(attempts, 0.1),
        transport=httpx.MockTransport(handler), sleep=record_sleep, **kwargs,
    )


async def test_sse_parser_skips_comments_and_stops_at_done():
    body = b'\n'.join([b": keep-alive", b"", b'data: {"a": 1}', b"event: x", b'data:{"a": 2}\r', b"data: [DONE]",
                        b'data: {"a": 3}', b""])

    async def chunks(size: int):
        for i in range(0, len(body), size):  # lines cut anywhere between network reads
            yield body[i:i + size]

    for size in (1, 7, len(body)):
        assert [e async for e in sse_data(chunks(size))] == [{"a": 1}, {"a": 2}]


async def test_sse_parser_rejects_garbage():
    async def chunks():
        yield b"data: {not json\n"

    with pytest.raises(EngineError, match="undecodable"):
        _ = [e async for e in sse_data(chunks())]


def test_meter_ttft_at_first_nonempty_chunk_and_tpot_over_the_rest():
    # start at 0; an empty chunk at 0.05 (no output yet); first token at 0.2; two more chunks; end at 0.5
    meter = StreamMeter(clock=FakeClock(0.0, 0.05, 0.2, 0.35, 0.5), wall_ms=lambda: 1000.0)
    meter.new_attempt()
    meter.observe(chunk("", 0))
    meter.observe(chunk("Hel", 1))
    meter.observe(chunk("Hello wo", 3))
    meter.observe(chunk("Hello world", 5, finish="length"))
    gen = meter.result()
    assert gen.ttft_ms == pytest.approx(200.0)
    assert gen.e2e_ms == pytest.approx(500.0)
    assert gen.tpot_ms == pytest.approx((500.0 - 200.0) / 4)
    assert (gen.text, gen.prompt_tokens, gen.cached_tokens, gen.completion_tokens) == ("Hello world", 10, 4, 5)
    assert gen.finish_reason == "length"


def test_meter_single_token_has_no_tpot_and_incremental_text_is_appended():
    meter = StreamMeter(clock=FakeClock(0.0, 0.3), wall_ms=lambda: 0.0)
    meter.observe(chunk("A", 1, finish="stop"))
    gen = meter.result()
    assert gen.ttft_ms == pytest.approx(300.0) and gen.tpot_ms is None
    meter = StreamMeter(clock=FakeClock(0.0, 0.1, 0.2), wall_ms=lambda: 0.0)
    meter.observe(chunk("ab", 1))
    meter.observe(chunk("cd", 2))  # an engine with incremental output
    assert meter.result().text == "abcd"


def test_meter_counts_first_token_by_completion_tokens_even_without_text():
    calls = []
    meter = StreamMeter(clock=FakeClock(0.0, 0.1, 0.4), wall_ms=lambda: 0.0, on_first_token=lambda: calls.append(1))
    meter.observe(chunk("", 1))  # a token that does not decode to text yet
    meter.observe(chunk("x", 2))
    assert meter.result().ttft_ms == pytest.approx(100.0)
    assert calls == [1]


def test_payload_prefers_input_ids():
    with_ids = InferenceRequest(input_ids=[1, 2, 3], sampling=SamplingParams(max_new_tokens=4, stop=["\n"]))
    body = generate_payload(with_ids)
    assert body["input_ids"] == [1, 2, 3] and "text" not in body and body["stream"] is True
    assert body["sampling_params"]["max_new_tokens"] == 4 and body["sampling_params"]["stop"] == ["\n"]
    body = generate_payload(request(prompt="hi"))
    assert body["text"] == "hi" and "input_ids" not in body


async def test_generate_streams_and_measures():
    seen = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen["body"] = json.loads(req.content)
        return httpx.Response(200, content=sse(chunk("Hi", 1), chunk("Hi there", 2, finish="stop")),
                              headers={"content-type": "text/event-stream"})

    eng = client(handler, clock=FakeClock(0.0, 0.25, 0.45))
    gen = await eng.generate(request(prompt="Say hi"))
    await eng.aclose()
    assert seen["body"]["text"] == "Say hi" and seen["body"]["stream"] is True
    assert gen.text == "Hi there" and gen.completion_tokens == 2 and gen.cached_tokens == 4
    assert gen.ttft_ms == pytest.approx(250.0) and gen.tpot_ms == pytest.approx(200.0)
    assert gen.attempts == 1


async def test_503_is_retried_with_exponential_backoff_then_succeeds():
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) <= 2:
            return httpx.Response(503, text="busy")
        return httpx.Response(200, content=sse(chunk("ok", 1, finish="stop")))

    sleeps: list[float] = []
    eng = client(handler, attempts=3, sleeps=sleeps)
    gen = await eng.generate(request())
    assert gen.text == "ok" and gen.attempts == 3
    assert_jittered(sleeps, [0.1, 0.2])


async def test_retries_are_bounded():
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(1)
        raise httpx.ConnectError("refused", request=req)

    sleeps: list[float] = []
    eng = client(handler, attempts=2, sleeps=sleeps)
    with pytest.raises(EngineUnavailable, match="gave up after 3 attempts"):
        await eng.generate(request())
    assert len(calls) == 3
    assert_jittered(sleeps, [0.1, 0.2])


async def test_400_is_rejected_without_retry():
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(400, json={"message": "input too long"})

    with pytest.raises(EngineRejected, match="input too long"):
        await client(handler).generate(request())
    assert len(calls) == 1


async def test_in_stream_error_is_a_rejection():
    def handler(req: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=sse({"error": {"message": "context length exceeded"}}))

    with pytest.raises(EngineRejected, match="context length exceeded"):
        await client(handler).generate(request())


async def test_abort_finish_reason_maps_by_status():
    def handler(req: httpx.Request) -> httpx.Response:
        meta = chunk("", 0)
        meta["meta_info"]["finish_reason"] = {"type": "abort", "message": "bad", "status_code": 400}
        return httpx.Response(200, content=sse(meta))

    with pytest.raises(EngineRejected, match="bad"):
        await client(handler).generate(request())


def assert_jittered(sleeps: list[float], ceilings: list[float]) -> None:
    """Each delay lies in [ceiling * (1 - jitter), ceiling] (RetryPolicy's default jitter is 0.5)."""
    assert len(sleeps) == len(ceilings)
    for slept, ceiling in zip(sleeps, ceilings, strict=True):
        assert ceiling * 0.5 - 1e-9 <= slept <= ceiling + 1e-9


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
async def test_transient_statuses_are_retried(status: int):
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(status, text="transient")
        return httpx.Response(200, content=sse(chunk("ok", 1, finish="stop")))

    gen = await client(handler).generate(request())
    assert gen.text == "ok" and len(calls) == 2


async def test_501_is_an_error_without_retry():
    calls = []

    def handler(req: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(501, text="not implemented")

    with pytest.raises(EngineError) as info:
        await client(handler).generate(request())
    assert not isinstance(info.value, EngineRejected | EngineUnavailable) and len(calls) == 1


def test_parse_v1_loads_sums_dp_ranks():
    body = {"loads": [
        {"dp_rank": 0, "num_running_reqs": 3, "num_waiting_reqs": 1, "token_usage": 0.25, "max_total_num_tokens": 1000},
        {"dp_rank": 1, "num_running_reqs": 2, "num_waiting_reqs": 4, "token_usage": 0.5, "max_total_num_tokens": 1000},
    ], "aggregate": {}}
    load = parse_v1_loads(body)
    assert (load.running, load.waiting, load.kv_usage, load.max_kv_tokens) == (5, 5, 0.5, 2000)
    with pytest.raises(ValueError):
        parse_v1_loads({"load": 3})


def test_parse_get_load_separates_running_from_waiting():
    load = parse_get_load([{"dp_rank": 0, "num_reqs": 7, "num_waiting_reqs": 2, "num_tokens": 250}], 1000)
    assert (load.running, load.waiting, load.kv_usage) == (5, 2, 0.25)
    assert parse_get_load({"num_reqs": 1, "num_waiting_reqs": 0, "num_tokens": 9}, 0).kv_usage == 0.0


def test_parse_metrics_reads_sglang_gauges():
    text = """# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="m",tp_rank="0"} 4.0
sglang:num_running_reqs{model_name="m",tp_rank="1"} 4.0
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{model_name="m"} 2.0
# TYPE sglang:token_usage gauge
sglang:token_usage{model_name="m"} 0.31
# TYPE sglang:max_total_num_tokens gauge
sglang:max_total_num_tokens{model_name="m"} 161721.0
# TYPE sglang:prompt_tokens_total counter
sglang:prompt_tokens_total{model_name="m"} 8.1e+06
"""
    load = parse_metrics(text)
    assert (load.running, load.waiting, load.kv_usage, load.max_kv_tokens) == (4, 2, 0.31, 161721)
    with pytest.raises(ValueError):
        parse_metrics("# nothing here\n")


async def test_load_falls_back_and_remembers_the_endpoint_that_answered():
    paths: list[str] = []
    metrics = "# TYPE sglang:num_running_reqs gauge\nsglang:num_running_reqs 3\nsglang:num_queue_reqs 1\n"

    def handler(req: httpx.Request) -> httpx.Response:
        paths.append(req.url.path)
        if req.url.path == "/metrics":
            return httpx.Response(200, text=metrics)
        return httpx.Response(404)

    eng = client(handler)
    first = await eng.load()
    second = await eng.load()
    assert paths == ["/v1/loads", "/get_load", "/metrics", "/metrics"]
    assert (first.running, first.waiting, first.source) == (3, 1, "/metrics") and second == first


async def test_load_raises_when_no_endpoint_answers():
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("down", request=req)

    with pytest.raises(EngineUnavailable, match="no load endpoint"):
        await client(handler).load()
