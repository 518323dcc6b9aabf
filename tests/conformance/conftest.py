"""The SGLang conformance suite: SGLang's own endpoint tests, replayed against a server under test.

A case asks for `target` (a base URL and the API key to send) and talks to it over HTTP only, with the
official `openai` client or httpx, as SGLang's tests use `openai` and `requests`. Today the one target
is `lodestar emulator`, run as a child process with its defaults except a fast time scale and an API
key (as SGLang's tests launch their servers with one); the gateway's suite adds a `gateway` target to
TARGETS. Cases that call SGLang's native endpoints (/generate, /flush_cache, /get_server_info,
/metrics, /health_generate) are marked `sglang_native`; a front door that serves only the OpenAI API
deselects them. Cases that need a server started with other flags (a context length, a payload limit,
a clean cache) get their own through `launch`.

The client-side tokenizer (`tokenizer`) is the emulator's, standing where SGLang's tests load the model's
Hugging Face tokenizer; a server's token counts and ids must agree with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from sglang_target import TARGETS, Target, launch_emulator

from sim.emulator.model_card import model_card
from sim.emulator.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def emulator_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with launch_emulator(tmp_path_factory.mktemp("emulator") / "emulator.log") as target:
        yield target


@pytest.fixture(scope="session", params=TARGETS)
def target(request: pytest.FixtureRequest) -> Target:
    """The server a case runs against (one parametrization per entry of TARGETS)."""
    return request.getfixturevalue(f"{request.param}_target")


@pytest.fixture(scope="module")
def launch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Target]]:
    """Start a server of the suite's kind with extra flags (SGLang's `other_args`); stopped after the module."""
    with contextlib.ExitStack() as stack:
        def start(*args: str) -> Target:
            log = tmp_path_factory.mktemp("emulator") / "emulator.log"
            return stack.enter_context(launch_emulator(log, *args))

        yield start


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The served model's tokenizer, as SGLang's tests load it with get_tokenizer(model)."""
    return Tokenizer(model_card("llama-3.1-8b"))
