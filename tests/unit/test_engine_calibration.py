"""The engine's idle TTFT/TPOT agree with the measured profiles within the documented fit error."""

from __future__ import annotations

from functools import cache

import pytest
from engine_driver import make_request, run

from lodestar import hardware
from lodestar.settings import Settings
from sim.engine import Engine, PerfModel
from sim.engine.perf_model import load_calibration
from sim.engine.profiles import MEASURED_GPUS, ProfileReference, load_profiles

CAL = load_calibration()
LLAMA = hardware.model("llama-3.1-8b")
PROFILES = load_profiles(Settings().data_dir, LLAMA)  # empty without the data: use the committed references


@cache
def profile_reference(gpu: str) -> ProfileReference:
    return ProfileReference(PROFILES[gpu], LLAMA, PerfModel(gpu))


def reference_ttft(gpu: str, prompt: int, chunk: int) -> float:
    if gpu in PROFILES:
        value = profile_reference(gpu).ttft(prompt, chunk)
        assert value is not None
        return value
    return CAL["reference"][gpu]["ttft"][str(prompt)]["reference_s"]


def reference_tpot(gpu: str, context: int) -> float:
    if gpu in PROFILES:
        return profile_reference(gpu).decode_step(context)
    return CAL["reference"][gpu]["tpot"][str(context)]["reference_s"]


def test_every_gpu_is_calibrated_and_every_measured_gpu_has_references():
    assert set(hardware.GPUS) <= set(CAL["gpus"])
    assert set(MEASURED_GPUS) == set(CAL["reference"]) == set(CAL["fit_error_pct"])


@pytest.mark.parametrize("gpu", MEASURED_GPUS)
def test_idle_ttft_and_tpot_within_documented_error(gpu):
    errors = CAL["fit_error_pct"][gpu]
    prompts = [int(p) for p in CAL["reference"][gpu]["ttft"]]
    assert len(prompts) >= 3
    for prompt in prompts:
        engine = Engine(gpu)
        log = run(engine, [make_request("a", prompt, 0.0, max_new_tokens=2)])
        expected = reference_ttft(gpu, prompt, engine.cfg.chunked_prefill_size)
        assert abs(log.first_token_s["a"] / expected - 1) * 100 <= errors["ttft_max"] + 0.01, prompt
    for context in (int(c) for c in CAL["reference"][gpu]["tpot"]):
        engine = Engine(gpu)
        log = run(engine, [make_request("a", context, 0.0, max_new_tokens=2)])
        tpot = log.finish_s["a"] - log.first_token_s["a"]
        assert abs(tpot / reference_tpot(gpu, context) - 1) * 100 <= errors["tpot_max"] + 0.01, context
