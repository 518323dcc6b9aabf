"""The SGLang conformance suite: SGLang's own endpoint tests, replayed against a server under test.

A case asks for `target` (a base URL and the API key to send) and talks to it over HTTP only, with the
official `openai` client or httpx, as SGLang's tests use `openai` and `requests`. The targets (TARGETS):
`emulator`, `lodestar emulator` run as a child process with its defaults except a fast time scale and an
API key (as SGLang's tests launch their servers with one); and `gateway`, `lodestar gateway` in front of
the whole pipeline (an emulator, its worker, a dispatcher) on the real Kafka broker and Redis, taking that
API key. Cases that call SGLang's native endpoints (/generate, /flush_cache, /get_server_info,
/metrics, /health_generate) are marked `sglang_native`. Cases that call endpoints beyond generation
(/v1/responses, /v1/score, /flush_cache, /get_server_info, SGLang's /metrics, /health_generate) say which
with `endpoints(...)`, and are deselected (not run, not skipped) for a target that does not serve them
(sglang_target.SERVES): the gateway serves generation only. Cases that need a server started with other
flags (a context length, a payload limit, a clean cache) get their own through `launch`, of each target
kind: for the gateway a fresh pipeline, its emulator taking the flags but those the gateway applies.

The client-side tokenizer (`tokenizer`) is the emulator's, standing where SGLang's tests load the model's
Hugging Face tokenizer; a server's token counts and ids must agree with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest
from sglang_target import LAUNCHERS, SERVES, TARGETS, Target, launch_emulator, launch_gateway

from sim.emulator.model_card import model_card
from sim.emulator.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def emulator_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with launch_emulator(tmp_path_factory.mktemp("emulator") / "emulator.log") as target:
        yield target


@pytest.fixture(scope="session")
def gateway_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with launch_gateway(tmp_path_factory.mktemp("gateway")) as target:
        yield target


@pytest.fixture(scope="session", params=TARGETS)
def target(request: pytest.FixtureRequest) -> Target:
    """The server a case runs against (one parametrization per entry of TARGETS)."""
    return request.getfixturevalue(f"{request.param}_target")


@pytest.fixture(scope="module", params=TARGETS)
def launch(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[Callable[..., Target]]:
    """Start a server of each target kind with extra flags (SGLang's `other_args`); stopped after the module."""
    with contextlib.ExitStack() as stack:
        def start(*args: str) -> Target:
            return stack.enter_context(LAUNCHERS[request.param](tmp_path_factory.mktemp(request.param), *args))

        yield start


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Deselect the cases a target cannot answer: those calling endpoints it does not serve."""
    keep, drop = [], []
    for item in items:
        marker = item.get_closest_marker("endpoints")
        params = getattr(getattr(item, "callspec", None), "params", {})
        kind = params.get("target") or params.get("launch")
        if marker is not None and kind is not None and not set(marker.args) <= SERVES[kind]:
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def tokenizer() -> Tokenizer:
    """The served model's tokenizer, as SGLang's tests load it with get_tokenizer(model)."""
    return Tokenizer(model_card("llama-3.1-8b"))
