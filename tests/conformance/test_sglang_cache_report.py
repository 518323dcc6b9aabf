"""SGLang's test/srt/openai_server/features/test_cache_report.py, replayed against a server of its own
(the cases compare cached-token counts, so no other case may warm its cache), started as SGLang's is
with `--chunked-prefill-size 40` (the report is enabled by default).

Two adaptations. SGLang omits `prompt_tokens_details` when nothing was cached, and a first request
under a new `cache_salt` has nothing cached, so the replay reads missing details as 0 where SGLang's
test would fail on `None.cached_tokens`. And SGLang's last assertion (the second salt2 request has as
many cached tokens as the first) contradicts its own message ("should have cache hit"); the replay
checks the hit: all but the last prompt token.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from sglang_target import MODEL, Target


def cached(usage: Any) -> int:
    return usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details is not None else 0


class CacheReport:
    def __init__(self, target: Target) -> None:
        self.target = target
        self.client = target.openai()
        usage = self.chat("1").usage
        template = usage.prompt_tokens - 1  # the request is one token plus the template
        usage2 = self.chat("2").usage
        assert cached(usage2) <= template
        self.min_cached = max(cached(usage2), template - cached(usage2))

    def chat(self, message: str, max_tokens: int = 100, **extra: Any) -> Any:
        return self.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": message}],
                                                   temperature=0, max_tokens=max_tokens, **extra)


@pytest.fixture(scope="module")
def report(launch: Callable[..., Target]) -> CacheReport:
    return CacheReport(launch("--chunked-prefill-size", "40"))


@pytest.mark.sglang_native
def test_generate(report: CacheReport) -> None:
    body = {"text": "_ The capital of France is", "stream": False, "return_logprob": False,
            "top_logprobs_num": 0, "logprob_start_len": 0,
            "sampling_params": {"temperature": 0, "max_new_tokens": 128, "n": 1, "stop_token_ids": [119690]}}
    with report.target.http() as http:
        first = http.post("/generate", json=body).json()["meta_info"]
        assert first["cached_tokens"] < report.min_cached
        second = http.post("/generate", json=body).json()["meta_info"]
    assert second["cached_tokens"] == second["prompt_tokens"] - 1


def test_cache_split_prefill_openai(report: CacheReport) -> None:
    message = ("€ This is a very long and unique text that should not be already cached, the twist is"
               " that it should be longer than the chunked-prefill-size, so it should be split among"
               " several prefill requests. Still, it shouldn't be cached")
    first = report.chat(message).usage
    assert cached(first) <= report.min_cached
    second = report.chat(message).usage
    assert cached(second) > 0 and cached(second) == second.prompt_tokens - 1


def test_cache_report_openai(report: CacheReport) -> None:
    report.chat("Introduce the capital of France.")  # warms the template
    first_1 = cached(report.chat("How many sparrow do you need to lift a coconut?").usage)
    usage_2 = report.chat("* sing something about cats").usage
    assert first_1 == cached(usage_2)  # they share only the template
    report.chat("* sing something about cats and dogs")
    resp = report.chat("* sing something about cats, please")
    assert cached(resp.usage) >= usage_2.prompt_tokens - report.min_cached


def test_cache_salt_effectiveness(report: CacheReport) -> None:
    message = "What is the capital of Japan?"
    salt1_first = report.chat(message, max_tokens=10, extra_body={"cache_salt": "salt1"}).usage
    salt1_second = report.chat(message, max_tokens=10, extra_body={"cache_salt": "salt1"}).usage
    assert cached(salt1_second) > cached(salt1_first)
    assert cached(salt1_second) == salt1_first.prompt_tokens - 1
    salt2_first = report.chat(message, max_tokens=10, extra_body={"cache_salt": "salt2"}).usage
    assert cached(salt2_first) <= cached(salt1_first) + report.min_cached  # salt1's entries are not shared
    salt2_second = report.chat(message, max_tokens=10, extra_body={"cache_salt": "salt2"}).usage
    assert cached(salt2_second) == salt1_first.prompt_tokens - 1
