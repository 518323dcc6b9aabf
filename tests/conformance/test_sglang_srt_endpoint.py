"""SGLang's test/srt/test_srt_endpoint.py, replayed: native /generate with batches, n, logprobs, the cache.

Left out (docs/emulator.md says why): test_logprob_grammar (regex-constrained decoding), the custom logit
processor cases (their processor travels as pickled code), test_logit_bias / test_forbidden_token /
test_logit_bias_isolation (the emulator does not sample), and the stateful logit processor cases,
which SGLang itself skips.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from sglang_target import Target

pytestmark = pytest.mark.sglang_native


def generate(target: Target, body: dict[str, Any]) -> Any:
    with target.http() as http:
        r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def stream_generate(target: Target, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The `data:` chunks of a streamed /generate, as SGLang's test reads them."""
    chunks = []
    with target.http() as http, http.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line[6:] != "[DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


def decode_body(n: int = 1, batch: bool = False, **extra: Any) -> dict[str, Any]:
    text = "The capital of France is"
    return {"text": [text] if batch else text,
            "sampling_params": {"temperature": 0 if n == 1 else 0.5, "max_new_tokens": 16, "n": n},
            "logprob_start_len": 0, **extra}


def test_simple_decode(target: Target) -> None:
    out = generate(target, decode_body())
    assert out["meta_info"]["completion_tokens"] == 16 and out["text"]


def test_simple_decode_batch(target: Target) -> None:
    out = generate(target, decode_body(batch=True))
    assert isinstance(out, list) and len(out) == 1 and out[0]["meta_info"]["completion_tokens"] == 16


def test_parallel_sample(target: Target) -> None:
    out = generate(target, decode_body(n=3))
    assert isinstance(out, list) and len(out) == 3
    assert len({o["meta_info"]["id"] for o in out}) == 3
    # SGLang first prefills the prompt once, so every sample finds it cached
    assert all(o["meta_info"]["cached_tokens"] == o["meta_info"]["prompt_tokens"] - 1 for o in out)


def test_parallel_sample_stream(target: Target) -> None:
    chunks = stream_generate(target, decode_body(n=3))
    by_index: dict[int, list[dict[str, Any]]] = {}
    for c in chunks:
        by_index.setdefault(c["index"], []).append(c)
    assert sorted(by_index) == [0, 1, 2]
    for seq in by_index.values():
        assert [c["meta_info"]["finish_reason"] is not None for c in seq].count(True) == 1
        assert seq[-1]["meta_info"]["completion_tokens"] == 16
        assert all(b["text"].startswith(a["text"]) for a, b in zip(seq, seq[1:], strict=False))


def test_logprob(target: Target) -> None:
    out = generate(target, decode_body(return_logprob=True, top_logprobs_num=5, return_text_in_logprobs=True))
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == meta["prompt_tokens"]
    assert meta["input_token_logprobs"][0][0] is None and meta["input_top_logprobs"][0] is None
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == 16
    assert all(len(row) == 5 for row in meta["output_top_logprobs"])
    assert out["text"] == "".join(e[2] for e in meta["output_token_logprobs"])


def test_logprob_start_len(target: Target) -> None:
    start, new_tokens = 4, 4
    prompts = ["I have a very good idea on", "Today is a sunndy day and"]
    out = generate(target, {"text": prompts, "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens},
                            "return_logprob": True, "top_logprobs_num": 5, "return_text_in_logprobs": True,
                            "logprob_start_len": start})
    for prompt, res in zip(prompts, out, strict=True):
        meta = res["meta_info"]
        assert meta["prompt_tokens"] == start + len(meta["input_token_logprobs"])
        assert prompt.endswith("".join(e[-1] for e in meta["input_token_logprobs"]))
        assert meta["completion_tokens"] == new_tokens
        assert len(meta["output_token_logprobs"]) == new_tokens
        assert res["text"] == "".join(e[-1] for e in meta["output_token_logprobs"])


def test_logprob_with_chunked_prefill(target: Target) -> None:
    """A long prompt (~72k tokens, chunked prefill) that asks for output logprobs."""
    new_tokens = 4
    out = generate(target, {"text": "I have a very good idea on this. " * 8000,
                            "sampling_params": {"temperature": 0, "max_new_tokens": new_tokens},
                            "return_logprob": True, "logprob_start_len": -1, "top_logprobs_num": 5})
    meta = out["meta_info"]
    assert meta["completion_tokens"] == new_tokens
    assert len(meta["output_token_logprobs"]) == len(meta["output_top_logprobs"]) == new_tokens
    for i in range(new_tokens):
        assert meta["output_token_logprobs"][i] == meta["output_top_logprobs"][i][0]  # temperature 0: top-1
        assert len(meta["output_top_logprobs"][i]) == 5


def test_logprob_match(target: Target) -> None:
    """The output logprobs are what a prefill of prompt + output gives for the same tokens."""
    def run(prompt: Any, max_new_tokens: int) -> dict[str, Any]:
        key = "text" if isinstance(prompt, str) else "input_ids"
        return generate(target, {key: prompt, "return_logprob": True, "return_text_in_logprobs": True,
                                 "logprob_start_len": 0, "sampling_params": {
                                     "temperature": 1.0, "max_new_tokens": max_new_tokens, "ignore_eos": True}})

    gen = run("I have a very good idea on how to", 512)
    output_logprobs = np.array([e[0] for e in gen["meta_info"]["output_token_logprobs"]])
    input_tokens = [e[1] for e in gen["meta_info"]["input_token_logprobs"]]
    output_tokens = [e[1] for e in gen["meta_info"]["output_token_logprobs"]]
    score = run(input_tokens + output_tokens, 0)
    assert score["meta_info"]["completion_tokens"] == 0 and score["text"] == ""
    rescored = np.array([e[0] for e in score["meta_info"]["input_token_logprobs"][gen["meta_info"]["prompt_tokens"]:]])
    assert np.max(np.abs(output_logprobs - rescored)) < 0.35


def run_logprob_check(target: Target, case: tuple[int, int, int, int, bool, int]) -> None:
    """SGLang's test_utils.run_logprob_check: token counts of every logprob list, top-1 at temperature 0."""
    input_len, output_len, temperature, start, want, top_n = case
    res = generate(target, {"input_ids": list(range(input_len)), "return_logprob": want,
                            "logprob_start_len": start, "top_logprobs_num": top_n,
                            "sampling_params": {"temperature": temperature, "max_new_tokens": output_len,
                                                "ignore_eos": True}})
    meta = res["meta_info"]
    assert meta["prompt_tokens"] == input_len and meta["completion_tokens"] == output_len
    if not want:
        return
    assert len(meta["input_token_logprobs"]) + start == meta["prompt_tokens"]
    assert len(meta["output_token_logprobs"]) == output_len
    if top_n:
        assert len(meta["input_top_logprobs"]) + start == meta["prompt_tokens"]
        assert len(meta["output_top_logprobs"]) == output_len
        for i in range(output_len):
            assert len(meta["output_top_logprobs"][i]) == top_n
            if temperature == 0:
                assert meta["output_token_logprobs"][i] == meta["output_top_logprobs"][i][0]


def test_logprob_mixed(target: Target) -> None:
    """SGLang runs input lengths up to 50000; the replay stops at 10000 to keep the responses (every input
    position's top-5 list) small enough for a 2-core CI host."""
    cases = [(input_len, output_len, 0, start, want, top_n)
             for input_len in (1000, 5000, 10000) for output_len in (4, 8) for start in (0, 500, 2500, 5000)
             for want in (True, False) for top_n in (0, 5) if start < input_len]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: run_logprob_check(target, c), cases))


@pytest.fixture(scope="module")
def clean(launch: Any) -> Target:
    return launch()


def test_cache_tokens(clean: Target) -> None:
    """SGLang's default page size is one token: every cached prefix is reported to the token."""
    with clean.http() as http:
        assert http.post("/flush_cache").status_code == 200

    def cached(input_ids: range) -> int:
        out = generate(clean, {"input_ids": list(input_ids), "sampling_params": {"max_new_tokens": 1}})
        return out["meta_info"]["cached_tokens"]

    assert cached(range(0, 100)) == 0
    assert cached(range(0, 10000)) == 100
    assert cached(range(0, 10000)) == 9999
    assert cached(range(0, 1000)) == 999
    assert cached(range(0, 11000)) == 10000


def test_get_server_info(target: Target) -> None:
    with target.http() as http:
        info = http.get("/get_server_info").json()
    assert isinstance(info["max_total_num_tokens"], int) and isinstance(info["version"], str)


def test_get_server_info_concurrent(target: Target) -> None:
    def get(_: int) -> int:
        with target.http() as http:
            r = http.get("/get_server_info")
            r.json()
            return r.status_code

    with ThreadPoolExecutor(30) as pool:
        assert set(pool.map(get, range(4))) == {200}
