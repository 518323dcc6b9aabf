"""SGLang's test/srt/openai_server/basic/test_openai_server.py, replayed with the official openai client:
completions and chat (echo, logprobs, batched prompts, n, token-id prompts; streaming and not), models,
the Responses API and /v1/score.

Left out (docs/emulator.md says why): test_regex (regex-constrained decoding), test_response_prefill
(it checks what a real model writes after a prefilled `{`), TestOpenAIV1Rerank (a cross-encoder model)
and TestOpenAIServerCustomLogitProcessor (the processor travels as pickled code).
"""

from __future__ import annotations

import itertools
from typing import Any

import openai
import pytest
from sglang_target import MODEL, Target

from sim.emulator.tokenizer import Tokenizer

PROMPT = "The capital of France is"


def completion_case(tokenizer: Tokenizer, use_list_input: bool, token_input: bool) -> tuple[Any, int, int]:
    """(prompt argument, number of prompts, total prompt tokens) as SGLang's run_completion builds them."""
    prompt: Any = tokenizer.encode(PROMPT) if token_input else PROMPT
    tokens = len(tokenizer.encode(PROMPT))
    if use_list_input:
        return [prompt, prompt], 2, 2 * tokens
    return prompt, 1, tokens


def split_usage(stream: Any) -> tuple[list[Any], Any]:
    """A stream's chunks with choices, and the usage its last chunk carries (include_usage)."""
    chunks, usage = [], None
    for response in stream:
        if response.usage is not None:
            usage = response.usage
        else:
            chunks.append(response)
    return chunks, usage


MATRIX = list(itertools.product([False, True], [None, 5], [True, False], [1, 2], [False, True]))


@pytest.mark.parametrize(("echo", "logprobs", "use_list_input", "n", "token_input"), MATRIX)
def test_completion(target: Target, tokenizer: Tokenizer, echo: bool, logprobs: int | None,
                    use_list_input: bool, n: int, token_input: bool) -> None:
    prompt, num_choices, num_prompt_tokens = completion_case(tokenizer, use_list_input, token_input)
    response = target.openai().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=32,
                                                  echo=echo, logprobs=logprobs, n=n)
    assert len(response.choices) == num_choices * n
    assert [c.index for c in response.choices] == list(range(num_choices * n))
    if echo:
        assert response.choices[0].text.startswith(PROMPT)
    if logprobs:
        lp = response.choices[0].logprobs
        assert lp and isinstance(lp.tokens[0], str)
        assert isinstance(lp.top_logprobs[1], dict) and len(lp.top_logprobs[1]) == logprobs
        if not echo:
            assert lp.token_logprobs[0]
        else:  # the prompt's logprobs come first, the first token's being null
            assert lp.token_logprobs[0] is None and len(lp.tokens) == len(tokenizer.encode(PROMPT)) + 32
    assert response.id and response.created
    assert response.usage.prompt_tokens == num_prompt_tokens
    assert response.usage.completion_tokens == 32 * num_choices * n
    assert response.usage.total_tokens == num_prompt_tokens + response.usage.completion_tokens


@pytest.mark.parametrize(("echo", "logprobs", "use_list_input", "n", "token_input"), MATRIX)
def test_completion_stream(target: Target, tokenizer: Tokenizer, echo: bool, logprobs: int | None,
                           use_list_input: bool, n: int, token_input: bool) -> None:
    prompt, num_choices, num_prompt_tokens = completion_case(tokenizer, use_list_input, token_input)
    generator = target.openai().completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=32,
                                                   echo=echo, logprobs=logprobs, n=n, stream=True,
                                                   stream_options={"include_usage": True})
    is_firsts: dict[int, bool] = {}
    texts: dict[int, str] = {}
    chunks, usage = split_usage(generator)
    for response in chunks:
        choice = response.choices[0]
        is_first = is_firsts.get(choice.index, True)
        if logprobs:
            assert choice.logprobs and isinstance(choice.logprobs.tokens[0], str)
            if not (is_first and echo):
                assert isinstance(choice.logprobs.top_logprobs[0], dict)
                assert len(choice.logprobs.top_logprobs[0]) == logprobs
        if is_first:
            if echo:
                assert choice.text.startswith(PROMPT)
            is_firsts[choice.index] = False
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        assert response.id and response.created
    assert sorted(is_firsts) == list(range(num_choices * n))
    assert usage is not None and usage.prompt_tokens == num_prompt_tokens
    assert usage.completion_tokens == 32 * num_choices * n and usage.total_tokens > 0
    assert all(len(tokenizer.encode(t.removeprefix(PROMPT if echo else ""), add_bos=False)) == 32
               for t in texts.values())


CHAT = [{"role": "system", "content": "You are a helpful AI assistant"},
        {"role": "user", "content": "What is the capital of France? Answer in a few words."}]


@pytest.mark.parametrize(("logprobs", "n"), list(itertools.product([None, 5], [1, 2])))
def test_chat_completion(target: Target, logprobs: int | None, n: int) -> None:
    response = target.openai().chat.completions.create(
        model=MODEL, messages=CHAT, temperature=0, logprobs=bool(logprobs), top_logprobs=logprobs, n=n)
    if logprobs:
        content = response.choices[0].logprobs.content
        assert isinstance(content[0].top_logprobs[0].token, str)
        assert len(content[0].top_logprobs) == logprobs
        assert content[0].top_logprobs[0].token == content[0].token  # temperature 0: top-1 is the token
        assert "".join(c.token for c in content) == response.choices[0].message.content
    assert len(response.choices) == n
    assert response.choices[0].message.role == "assistant"
    assert isinstance(response.choices[0].message.content, str)
    assert response.id and response.created
    assert response.usage.prompt_tokens > 0 and response.usage.completion_tokens > 0
    assert response.usage.total_tokens > 0


@pytest.mark.parametrize(("logprobs", "n"), list(itertools.product([None, 5], [1, 2])))
def test_chat_completion_stream(target: Target, logprobs: int | None, n: int) -> None:
    generator = target.openai().chat.completions.create(
        model=MODEL, messages=CHAT[:1] + [{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, logprobs=bool(logprobs), top_logprobs=logprobs, stream=True,
        stream_options={"include_usage": True}, n=n)
    is_firsts: dict[int, bool] = {}
    finished: dict[int, int] = {}
    chunks, usage = split_usage(generator)
    for response in chunks:
        choice = response.choices[0]
        if choice.finish_reason is not None:
            finished[choice.index] = finished.get(choice.index, 0) + 1
        data = choice.delta
        if is_firsts.get(choice.index, True):
            assert data.role == "assistant"
            is_firsts[choice.index] = False
            continue
        if logprobs and not finished.get(choice.index):
            assert choice.logprobs
            assert isinstance(choice.logprobs.content[0].top_logprobs[0].token, str)
            assert len(choice.logprobs.content[0].top_logprobs) == logprobs
        assert isinstance(data.content, str) or choice.finish_reason
        assert response.id and response.created
    assert sorted(is_firsts) == list(range(n))
    assert finished == dict.fromkeys(range(n), 1)  # exactly one finish_reason chunk per choice
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0


def test_penalty(target: Target) -> None:
    response = target.openai().chat.completions.create(
        model=MODEL, messages=[CHAT[0], {"role": "user", "content": "Introduce the capital of France."}],
        temperature=0, max_tokens=32, frequency_penalty=1.0)
    assert isinstance(response.choices[0].message.content, str)


def test_model_list(target: Target) -> None:
    models = list(target.openai().models.list())
    assert len(models) == 1 and isinstance(getattr(models[0], "max_model_len", None), int)


def test_retrieve_model(target: Target) -> None:
    client = target.openai()
    model = client.models.retrieve(MODEL)
    assert model.id == MODEL and model.root == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("non-existent-model")


# ---- TestOpenAIServerv1Responses ----------------------------------------------------------------

def responses_payload(max_output_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": PROMPT, "temperature": 0.0, "top_p": 1.0, "max_output_tokens": max_output_tokens,
            "store": True, "parallel_tool_calls": True, "tool_choice": "auto", "truncation": "disabled", **extra}


@pytest.mark.parametrize("max_output_tokens", [32, 16])
def test_response(target: Target, max_output_tokens: int) -> None:
    resp = target.openai().responses.create(**responses_payload(max_output_tokens))
    assert resp.id and resp.object == "response" and resp.created_at
    assert isinstance(resp.model, str) and isinstance(resp.output, list)
    assert resp.status == "completed"
    assert resp.usage is not None and resp.usage.total_tokens >= 0
    assert resp.usage.output_tokens == max_output_tokens
    assert resp.usage.prompt_tokens >= 0 and resp.usage.completion_tokens == max_output_tokens  # 0.5.x's names
    assert resp.error is None and resp.incomplete_details is None
    assert resp.output_text


@pytest.mark.parametrize("max_output_tokens", [32, 16])
def test_response_stream(target: Target, max_output_tokens: int) -> None:
    seen: set[str] = set()
    text = ""
    final_usage_ok = False
    with target.openai().responses.stream(**responses_payload(max_output_tokens)) as stream:
        for event in stream:
            seen.add(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
            elif event.type == "response.completed":
                usage = event.response.usage
                final_usage_ok = all(getattr(usage, k, None) is not None
                                     for k in ("input_tokens", "output_tokens", "total_tokens"))
        final = stream.get_final_response()
    assert {"response.created", "response.in_progress", "response.completed"} <= seen
    assert text and final.output_text == text and final_usage_ok


def test_response_continues_a_stored_conversation(target: Target) -> None:
    """previous_response_id: the stored conversation prefixes the new input (and so is in the cache)."""
    client = target.openai()
    first = client.responses.create(**responses_payload(8))
    second = client.responses.create(model=MODEL, input="And of Germany?", previous_response_id=first.id,
                                     max_output_tokens=8)
    assert second.previous_response_id == first.id
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # all of the first prompt but its last piece, which the answer's first word joins when re-tokenized
    assert second.usage.input_tokens_details.cached_tokens >= first.usage.input_tokens - 1
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_response_error(target: Target) -> None:
    with target.http() as http:
        r = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "previous_response_id": "bad"})
    assert r.status_code == 400
    error = r.json()["error"]
    assert {"message", "type", "code"} <= set(error)


def test_response_penalty(target: Target) -> None:
    with target.http() as http:
        r = http.post("/v1/responses", json={"model": MODEL, "input": "Introduce the capital of France.",
                                             "temperature": 0, "max_output_tokens": 32, "frequency_penalty": 1.0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "response" and "output" in body and "status" in body
    assert "prompt_tokens" in body["usage"] and "total_tokens" in body["usage"]


# ---- TestOpenAIV1Score ---------------------------------------------------------------------------

def score(target: Target, query: Any, items: Any, labels: list[int], apply_softmax: bool) -> Any:
    with target.http() as http:
        return http.post("/v1/score", json={"model": MODEL, "query": query, "items": items,
                                            "label_token_ids": labels, "apply_softmax": apply_softmax,
                                            "item_first": False})


@pytest.mark.parametrize("token_input", [False, True])
def test_score(target: Target, tokenizer: Tokenizer, token_input: bool) -> None:
    query, items = PROMPT, ["Paris", "London", "Berlin"]
    item_ids = [tokenizer.encode(i, add_bos=False) for i in items]
    labels = [ids[0] for ids in item_ids]
    r = score(target, tokenizer.encode(query, add_bos=False) if token_input else query,
              item_ids if token_input else items, labels, True)
    assert r.status_code == 200, r.text
    scores = r.json()["scores"]
    assert len(scores) == len(items)
    for row in scores:
        assert len(row) == len(labels) and all(isinstance(v, float) for v in row)
        assert sum(row) == pytest.approx(1.0, abs=1e-6)


def test_score_error_handling(target: Target) -> None:
    r = score(target, PROMPT, ["Paris", "London", "Berlin"], [999999], True)
    assert r.status_code == 400
    assert r.json()["type"] == "BadRequestError"
    assert "Token ID 999999 is out of vocabulary" in r.json()["message"]
