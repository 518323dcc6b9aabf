"""The emulator's timeline: idle TTFT equals the engine model's, and a repeated prompt is cached and faster.

Times here are the runner's emulated timestamps (engine time), which do not depend on how fast this
machine is: a step starts where the previous one ended or at the arrival that woke the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from lodestar.hashing import token_block_hashes
from sim.emulator.emulator import Emulator, EmulatorConfig
from sim.emulator.runner import RequestState
from sim.emulator.server import create_app
from sim.engine import Engine, EngineRequest

FAST = 0.02


def engine_ttft(gpu: str, ids: list[int], block_tokens: int = 16) -> float:
    """TTFT of one request on an idle engine, run in virtual time: the engine model's prediction."""
    engine = Engine(gpu)
    engine.add(EngineRequest("r", len(ids), tuple(token_block_hashes(ids, block_tokens)), block_tokens, 8, 0.0), 0.0)
    now = 0.0
    while True:
        out = engine.step(now)
        now += out.duration_s
        if out.first_tokens:
            return now


async def run_one(emu: Emulator, rid: str, ids: list[int]) -> RequestState:
    state = emu.submit(rid, emu.prepare(None, ids, {"max_new_tokens": 8}))
    await state.wait_finished()
    return state


@pytest.fixture(params=["H100", "L4"])
async def emulator(request: pytest.FixtureRequest) -> AsyncIterator[Emulator]:
    emu = Emulator(EmulatorConfig(gpu=request.param, time_scale=FAST))
    app = create_app(emu)
    async with app.router.lifespan_context(app):
        yield emu


@pytest.mark.parametrize("prompt_len", [1000, 4000, 12000])
async def test_idle_ttft_matches_engine_model(emulator: Emulator, prompt_len: int) -> None:
    ids = [(7919 * i) % 120_000 for i in range(prompt_len)]
    state = await run_one(emulator, "calib", ids)
    assert state.first_token_emu is not None
    emulated = state.first_token_emu - state.arrival_emu
    predicted = engine_ttft(emulator.engine.gpu_type, ids)
    assert emulated == pytest.approx(predicted, rel=1e-9)
    assert state.completion_tokens == 8 and state.finish_reason == {"type": "length", "length": 8}


async def test_repeated_prompt_is_cached_and_faster(emulator: Emulator) -> None:
    ids = [(104_729 * i) % 120_000 for i in range(4000)]
    cold = await run_one(emulator, "cold", ids)
    warm = await run_one(emulator, "warm", ids)
    assert cold.cached_tokens == 0
    assert 0 < warm.cached_tokens <= len(ids) - 1
    assert cold.first_token_emu is not None and warm.first_token_emu is not None
    assert warm.first_token_emu - warm.arrival_emu < 0.5 * (cold.first_token_emu - cold.arrival_emu)


async def test_decode_steps_follow_each_other_without_gaps(emulator: Emulator) -> None:
    """With one request running, the emulated end of its last token is TTFT plus its decode steps."""
    ids = list(range(1, 2001))
    state = await run_one(emulator, "decode", ids)
    assert state.finished_emu is not None and state.first_token_emu is not None
    decode_span = state.finished_emu - state.first_token_emu
    per_token = emulator.engine.perf.decode_time(1, len(ids))
    assert decode_span == pytest.approx(7 * per_token, rel=0.02)


async def test_runner_steps_through_idle_iterations() -> None:
    """When a KV-blocked batch drains, the engine spends one iteration idle before admitting the next
    requests; the runner must step again rather than wait for an arrival that never comes."""
    emu = Emulator(EmulatorConfig(gpu="L4", time_scale=0.01))
    app = create_app(emu)
    async with app.router.lifespan_context(app):
        states = [emu.submit(f"r{i}", emu.prepare(None, [(i * 7 + j) % 100_000 for j in range(5000)],
                                                  {"max_new_tokens": 50}))
                  for i in range(8)]
        await asyncio.wait_for(asyncio.gather(*(s.wait_finished() for s in states)), timeout=30)
    assert all(s.finish_reason == {"type": "length", "length": 50} for s in states)
