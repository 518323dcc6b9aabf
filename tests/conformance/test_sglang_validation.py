"""SGLang's test/srt/openai_server/validation/*, replayed: request length and body size limits, matched
stops, ignore_eos, and many long requests running at once.

Adapted: test_matched_stop stops on strings and patterns of the emulator's own output (" tok7",
`tok1[0-9]`) where SGLang's use what a real model writes ("\\n", `and|or`). Left out (docs/emulator.md
says why): test_finish_stop_eos (the emulator never ends on EOS: a request runs to max_new_tokens unless
a stop matches) and TestRegexPatternMaxLength (a unit test of SGLang's regex length estimator).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from sglang_target import MODEL, Target

from sim.emulator.tokenizer import Tokenizer

LONG_PROMPT = "Please write an extremely detailed and vivid fantasy story, at least 3,000 words long."


# ---- test_request_length_validation: --context-length 1000 ------------------------------------

@pytest.fixture(scope="module")
def short_context(launch: Callable[..., Target]) -> Target:
    return launch("--context-length", "1000")


@pytest.mark.parametrize("words", [1200, 999])
def test_input_longer_than_context_length(short_context: Target, words: int) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        short_context.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello " * words}], temperature=0)
    assert "is longer than the model's context length" in str(err.value)


def test_max_tokens_validation(short_context: Target) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        short_context.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello "}], temperature=0, max_tokens=1200)
    assert "Requested token count exceeds the model's maximum context" in str(err.value)


# ---- test_request_body_validation: --max-payload-size 1024 --------------------------------------

def test_body_larger_than_max_payload_size(launch: Callable[..., Target]) -> None:
    small = launch("--max-payload-size", "1024")
    with pytest.raises(openai.APIStatusError) as err:
        small.openai().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hello " * 200}], temperature=0)
    assert err.value.status_code == 413 and "Payload Too Large" in str(err.value)
    ok = small.openai().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=2)
    assert ok.choices[0].message.content


# ---- test_matched_stop ---------------------------------------------------------------------------

def finish(target: Target, route: str, max_tokens: int, **stop: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": MODEL, "temperature": 0, "top_p": 1, "max_tokens": max_tokens, **stop}
    if route == "completions":
        body["prompt"] = LONG_PROMPT
    else:
        body["messages"] = [{"role": "system", "content": "You are a helpful AI assistant"},
                            {"role": "user", "content": LONG_PROMPT}]
    with target.http() as http:
        r = http.post(f"/v1/{route}", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


ROUTES = ["completions", "chat/completions"]


@pytest.mark.parametrize("route", ROUTES)
def test_finish_stop_str(target: Target, route: str) -> None:
    choice = finish(target, route, 1000, stop=" tok7")
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == " tok7"
    text = choice["text"] if route == "completions" else choice["message"]["content"]
    assert text.endswith(" tok6")  # the matched stop string is cut off


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("pattern", [r"tok1[0-9]", r"tok5\d\s*$"])
def test_finish_stop_regex_str(target: Target, route: str, pattern: str) -> None:
    choice = finish(target, route, 1000, stop_regex=pattern)
    assert choice["finish_reason"] == "stop" and choice["matched_stop"] == pattern


@pytest.mark.parametrize("route", ROUTES)
def test_finish_length(target: Target, route: str) -> None:
    choice = finish(target, route, 5)
    assert choice["finish_reason"] == "length" and choice["matched_stop"] is None


# ---- test_openai_server_ignore_eos ---------------------------------------------------------------

def test_ignore_eos(target: Target, tokenizer: Tokenizer) -> None:
    client = target.openai()
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "Count from 1 to 20."}]
    default = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=200,
                                             extra_body={"ignore_eos": False})
    ignoring = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=200,
                                              extra_body={"ignore_eos": True})
    default_tokens = len(tokenizer.encode(default.choices[0].message.content))
    ignore_eos_tokens = len(tokenizer.encode(ignoring.choices[0].message.content))
    assert ignore_eos_tokens > default_tokens or ignore_eos_tokens >= 200
    assert ignoring.choices[0].finish_reason == "length"


# ---- test_large_max_new_tokens ---------------------------------------------------------------------

@pytest.mark.sglang_native
def test_large_max_new_tokens_run_concurrently(launch: Callable[..., Target]) -> None:
    """Four chats without max_tokens run in one decode batch, as the server's decode log shows.
    (Real time here, so that the four overlap for about a second.)"""
    server = launch("--time-scale", "1")
    client = server.openai()

    def chat(_: int) -> Any:
        return client.chat.completions.create(
            model=MODEL, temperature=0,
            messages=[{"role": "system", "content": "You are a helpful AI assistant"},
                      {"role": "user", "content": "Please repeat the world 'hello' for 10000 times."}])

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(chat, range(4)))
    assert all(a.choices[0].finish_reason == "length" for a in answers)
    assert server.log_path is not None
    deadline = time.monotonic() + 5
    while "#running-req: 4," not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "#running-req: 4," in server.log_path.read_text()
