"""SGLang's --api-key on the emulator, and the worker's engine client sending it (over the real ASGI app)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from starlette.applications import Starlette

from lodestar.schemas import InferenceRequest, SamplingParams
from sim.emulator.emulator import Emulator, EmulatorConfig
from sim.emulator.server import create_app
from workers.sglang_client import EngineUnauthorized, RetryPolicy, SGLangClient

KEY = "engine-key-0123456789"


@pytest.fixture
async def app() -> AsyncIterator[Starlette]:
    emu = Emulator(EmulatorConfig(gpu="H100", time_scale=0.02, api_key=KEY))
    emu.ready = True
    application = create_app(emu)
    async with application.router.lifespan_context(application):
        yield application


def http(app: Starlette, headers: dict[str, str] | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://emu", headers=headers)


GENERATE = {"text": "hello", "sampling_params": {"max_new_tokens": 2}}


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {KEY}", KEY, f"Bearer {KEY}x", "Bearer "])
async def test_the_api_refuses_a_missing_or_wrong_key_like_sglang(app: Starlette, authorization: str | None) -> None:
    async with http(app, {"Authorization": authorization} if authorization else None) as client:
        for method, path, body in [("POST", "/generate", GENERATE), ("GET", "/v1/loads", None),
                                   ("GET", "/server_info", None), ("GET", "/v1/models", None),
                                   ("POST", "/v1/chat/completions", {"model": "m", "messages": []})]:
            response = await client.request(method, path, json=body)
            assert response.status_code == 401, (path, response.text)
            assert response.json() == {"error": "Unauthorized"}


async def test_the_right_key_passes_in_any_case_of_bearer(app: Starlette) -> None:
    for scheme in ("Bearer", "bearer"):
        async with http(app, {"Authorization": f"{scheme} {KEY}"}) as client:
            assert (await client.post("/generate", json=GENERATE)).status_code == 200
            assert (await client.get("/v1/loads")).status_code == 200


async def test_health_metrics_and_preflight_stay_open(app: Starlette) -> None:
    async with http(app) as client:
        for path in ("/health", "/metrics"):
            assert (await client.get(path)).status_code == 200, path
        assert (await client.options("/generate")).status_code != 401


async def test_no_key_configured_means_an_open_api() -> None:
    emu = Emulator(EmulatorConfig(gpu="H100", time_scale=0.02))
    application = create_app(emu)
    async with application.router.lifespan_context(application), http(application) as client:
        assert (await client.post("/generate", json=GENERATE)).status_code == 200


def engine(app: Starlette, api_key: str | None) -> SGLangClient:
    return SGLangClient("http://emu", request_timeout_s=10, retry=RetryPolicy(3, 0.01), api_key=api_key,
                        transport=httpx.ASGITransport(app=app))


async def test_the_worker_client_sends_the_key_and_generates(app: Starlette) -> None:
    client = engine(app, KEY)
    try:
        load = await client.load()
        assert load.source == "/v1/loads"
        generation = await client.generate(InferenceRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=3)))
        assert generation.completion_tokens == 3
    finally:
        await client.aclose()


@pytest.mark.parametrize("api_key", [None, "not-the-key"])
async def test_a_refused_key_is_a_clear_error_not_a_retry_or_a_fallback(app: Starlette, api_key: str | None) -> None:
    client = engine(app, api_key)
    try:
        with pytest.raises(EngineUnauthorized, match="engine_api_key"):
            await client.load()  # /metrics is open, but a refused key must not pass for a healthy engine
        with pytest.raises(EngineUnauthorized, match="HTTP 401"):
            await client.generate(InferenceRequest(prompt="hi", sampling=SamplingParams(max_new_tokens=3)))
    finally:
        await client.aclose()
