"""`lodestar emulator` in a child process on a free loopback port, for the tests that talk to it over HTTP
(the worker integration tests and the SGLang conformance suite)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LODESTAR = str(Path(sys.executable).with_name("lodestar"))


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def emulator(gpu: str = "H100", log_path: Path | None = None, *args: str, log_level: str = "warning") -> Iterator[str]:
    """Run `lodestar emulator --gpu GPU [ARGS...]` on a free loopback port until it is warmed up (/health
    answers 200); yields its base URL. Its output goes to `log_path` (default: nowhere)."""
    if shutil.which(LODESTAR) is None:
        pytest.fail(f"the lodestar command is missing at {LODESTAR}: run `make setup`")
    port = free_port()
    log = open(log_path or os.devnull, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [LODESTAR, "emulator", "--gpu", gpu, "--port", str(port), "--log-level", log_level, *args],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"emulator exited with {proc.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail("emulator did not answer within 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
