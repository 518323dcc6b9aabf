"""SGLang's python/sglang/bench_serving.py request functions, replayed: the payloads its `sglang`,
`sglang-oai` and `sglang-oai-chat` backends send, streamed and read as it reads them (TTFT at the
first chunk with text, inter-token latencies between chunks, the output length from the last
`meta_info.completion_tokens` or `usage`)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from sglang_target import MODEL, Target

from sim.emulator.tokenizer import Tokenizer

OUTPUT_LEN = 24


def read_stream(target: Target, path: str, payload: dict[str, Any]) -> list[tuple[float, dict[str, Any]]]:
    """(arrival time since the request, parsed chunk) per `data:` line, up to [DONE]."""
    out = []
    start = time.perf_counter()
    with target.http() as http, http.stream("POST", path, json=payload) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            line = line.strip()
            if not line:
                continue
            chunk = line.removeprefix("data: ")
            if chunk == "[DONE]":
                break
            out.append((time.perf_counter() - start, json.loads(chunk)))
    return out


@pytest.mark.sglang_native
@pytest.mark.parametrize("prompt_kind", ["text", "input_ids"])
def test_sglang_generate(target: Target, tokenizer: Tokenizer, prompt_kind: str) -> None:
    prompt: Any = "word " * 500 if prompt_kind == "text" else tokenizer.encode("word " * 500)
    payload = {prompt_kind: prompt, "stream": True, "lora_path": None, "return_logprob": False,
               "return_routed_experts": False, "logprob_start_len": -1,
               "sampling_params": {"temperature": 0.0, "max_new_tokens": OUTPUT_LEN, "ignore_eos": True}}
    ttft, itl, output_len, last_len, latest, text = 0.0, [], 0, 0, 0.0, ""
    for at, data in read_stream(target, "/generate", payload):
        if data.get("text"):
            text = data["text"]
            output_len = data["meta_info"]["completion_tokens"]
            if ttft == 0.0:
                ttft = at
            else:
                new = output_len - last_len
                if new == 0:
                    continue
                itl.extend([(at - latest) / new] * new)
            latest, last_len = at, output_len
    assert ttft > 0 and output_len == OUTPUT_LEN and text
    assert len(itl) == OUTPUT_LEN - 1 and min(itl) >= 0  # a latency for every token after the first


def test_openai_completions(target: Target, tokenizer: Tokenizer) -> None:
    payload = {"model": MODEL, "prompt": "word " * 500, "best_of": 1, "max_tokens": OUTPUT_LEN, "stream": True,
               "temperature": 0.0, "ignore_eos": True}
    chunks = read_stream(target, "/v1/completions", payload)
    generated = "".join(data["choices"][0]["text"] for _, data in chunks)  # every chunk has a choice
    assert len(tokenizer.encode(generated, add_bos=False)) == OUTPUT_LEN
    assert chunks[-1][1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [True, False])
def test_openai_chat_completions(target: Target, tokenizer: Tokenizer, stream: bool) -> None:
    payload = {"model": MODEL, "messages": [{"role": "user", "content": "word " * 500}],
               "max_completion_tokens": OUTPUT_LEN, "stream": stream, "temperature": 0.0, "ignore_eos": True}
    if not stream:
        with target.http() as http:
            body = http.post("/v1/chat/completions", json=payload).json()
        assert body["choices"][0]["message"]["content"]
        assert body.get("usage", {}).get("completion_tokens") == OUTPUT_LEN
        return
    generated = ""
    output_len = OUTPUT_LEN
    for _, data in read_stream(target, "/v1/chat/completions", payload):
        delta = data.get("choices", [{}])[0].get("delta", {})
        generated += delta.get("content", "") or ""
        output_len = (data.get("usage") or {}).get("completion_tokens", output_len)
    assert len(tokenizer.encode(generated, add_bos=False)) == OUTPUT_LEN == output_len
