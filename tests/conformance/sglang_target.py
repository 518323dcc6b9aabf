"""The servers under test of the SGLang conformance suite (see conftest.py): their address and key, how to
reach them with the openai client or plain HTTP, how to start one, and which endpoints each serves."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from emulator_process import emulator
from gateway_stack import gateway_pipeline

API_KEY = "sk-123456"  # what SGLang's tests launch their servers with
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TIME_SCALE = "0.05"  # the emulated H100 runs 20x faster than real time: latency does not matter here
TARGETS = ["emulator", "gateway"]
# The endpoints each target serves. A case that calls others (marked `endpoints(...)`) is deselected for it:
# the gateway is a front door onto generation, not the engine's admin and scoring API.
GENERATION = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/models", "/generate"})
SERVES = {
    "emulator": GENERATION | {"/v1/responses", "/v1/score", "/flush_cache", "/get_server_info", "/metrics",
                              "/health_generate"},
    "gateway": GENERATION,
}


@dataclass(frozen=True)
class Target:
    """A server under test."""

    name: str
    base_url: str
    api_key: str
    log_path: Path | None = None

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def http(self) -> httpx.Client:
        """A plain HTTP client (SGLang's tests use `requests`)."""
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=120)

    def openai(self) -> openai.OpenAI:
        return openai.OpenAI(api_key=self.api_key, base_url=f"{self.base_url}/v1", timeout=120, max_retries=0)


@contextlib.contextmanager
def launch_emulator(log_path: Path, *args: str) -> Iterator[Target]:
    """A fresh emulator with the suite's defaults and `args`, logging at info level to `log_path`."""
    with emulator("H100", log_path, "--time-scale", TIME_SCALE, "--api-key", API_KEY, *args,
                  log_level="info") as url:
        yield Target("emulator", url, API_KEY, log_path)


# emulator flags that are the gateway's business when the gateway stands in front (flag -> gateway setting)
GATEWAY_FLAGS = {"--max-payload-size": "LODESTAR_GATEWAY__MAX_BODY_BYTES",
                 "--context-length": "LODESTAR_GATEWAY__CONTEXT_LENGTH"}
ENGINE_TOO = {"--context-length"}  # ... and that the engine must know as well


@contextlib.contextmanager
def launch_gateway(log_dir: Path, *args: str) -> Iterator[Target]:
    """A fresh pipeline (emulator, worker, dispatcher) behind a gateway that takes the suite's API key; the
    emulator gets `args` but for the flags the gateway applies (GATEWAY_FLAGS). The target's log is the
    emulator's (the engine's log lines SGLang's tests read)."""
    engine_args, env = [], {}
    time_scale = float(TIME_SCALE)
    pairs = list(zip(args[::2], args[1::2], strict=True))
    for flag, value in pairs:
        if flag in GATEWAY_FLAGS:
            env[GATEWAY_FLAGS[flag]] = value
        if flag == "--time-scale":
            time_scale = float(value)
        elif flag not in GATEWAY_FLAGS or flag in ENGINE_TOO:
            engine_args += [flag, value]
    with gateway_pipeline(log_dir, emulator_args=[*engine_args, "--log-level", "info"], api_key=API_KEY,
                          gateway_env=env, time_scale=time_scale) as pipe:
        yield Target("gateway", pipe.urls[0], API_KEY, pipe.emulator_log)


LAUNCHERS = {"emulator": lambda d, *a: launch_emulator(d / "emulator.log", *a), "gateway": launch_gateway}
