"""The server under test of the SGLang conformance suite (see conftest.py): its address and key, how to
reach it with the openai client or plain HTTP, and how to start an emulator for it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from emulator_process import emulator

API_KEY = "sk-123456"  # what SGLang's tests launch their servers with
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
TIME_SCALE = "0.05"  # the emulated H100 runs 20x faster than real time: latency does not matter here
TARGETS = ["emulator"]


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
