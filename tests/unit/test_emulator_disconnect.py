"""A client that goes away aborts its request in the engine (real uvicorn server on a loopback port)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import pytest
import uvicorn

from sim.emulator.emulator import Emulator, EmulatorConfig
from sim.emulator.server import create_app

LONG = {"text": "tell me everything", "sampling_params": {"max_new_tokens": 100_000}}


@pytest.fixture
async def served() -> AsyncIterator[tuple[Emulator, str]]:
    emu = Emulator(EmulatorConfig(gpu="H100", time_scale=0.1))
    config = uvicorn.Config(create_app(emu), host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield emu, f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


async def wait_for_abort(emu: Emulator) -> None:
    for _ in range(500):
        if not emu.runner.states and not emu.engine.has_work():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"request still in flight: {list(emu.runner.states)}")


def aborted(emu: Emulator) -> float | None:
    return emu.metrics.registry.get_sample_value("sglang:num_aborted_requests_total",
                                                 {"model_name": emu.served_model_name})


async def test_streaming_client_disconnect_aborts(served: tuple[Emulator, str]) -> None:
    emu, url = served
    async with httpx.AsyncClient(base_url=url) as client:
        async with client.stream("POST", "/generate", json={**LONG, "stream": True}) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    break  # one chunk, then hang up
        await wait_for_abort(emu)
    assert aborted(emu) == 1


async def test_waiting_client_disconnect_aborts(served: tuple[Emulator, str]) -> None:
    emu, url = served
    async with httpx.AsyncClient(base_url=url) as client:
        call = asyncio.create_task(client.post("/v1/completions", json={"prompt": "x", "max_tokens": 100_000}))
        while not emu.runner.states:
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await wait_for_abort(emu)
    assert aborted(emu) == 1


async def test_parallel_samples_stream_disconnect_aborts_them_all(served: tuple[Emulator, str]) -> None:
    emu, url = served
    body = {**LONG, "stream": True, "sampling_params": {"n": 3, "max_new_tokens": 100_000}}
    async with httpx.AsyncClient(base_url=url) as client:
        async with client.stream("POST", "/generate", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    assert json.loads(line[5:])["index"] in (0, 1, 2)
                    break  # then hang up
        await wait_for_abort(emu)
    assert aborted(emu) == 3
