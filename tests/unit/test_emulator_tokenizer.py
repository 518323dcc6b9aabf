"""The emulator's deterministic tokenizer, filler output, stop matching and sampling-param validation."""

from __future__ import annotations

import json
import re

import pytest

from sim.emulator.model_card import model_card
from sim.emulator.sampling import DEFAULT_MAX_NEW_TOKENS, parse_sampling_params
from sim.emulator.tokenizer import Tokenizer, render_chat

LLAMA = model_card("llama-3.1-8b")
QWEN = model_card("qwen2.5-7b")


def test_one_token_per_word_plus_bos() -> None:
    tok = Tokenizer(LLAMA)
    ids = tok.encode(" ".join(f"word{i}" for i in range(3000)))
    assert len(ids) == 3001
    assert ids[0] == LLAMA.bos_token_id
    assert all(0 <= t < LLAMA.vocab for t in ids)


def test_qwen_has_no_bos_and_input_is_deterministic() -> None:
    a, b = Tokenizer(QWEN), Tokenizer(QWEN)
    text = "Hello, world!  How are you?"
    assert a.encode(text) == b.encode(text)
    assert len(a.encode(text)) == len(["Hello", ",", " world", "!", "  How", " are", " you", "?"])


def test_shared_text_prefix_gives_shared_id_prefix() -> None:
    tok = Tokenizer(LLAMA)
    system = " ".join(f"rule{i}" for i in range(200))
    a = tok.encode(system + " first question here")
    b = tok.encode(system + " second one")
    common = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert common == 201  # BOS + 200 words


def test_special_tokens_are_single_pieces() -> None:
    tok = Tokenizer(LLAMA)
    assert len(tok.encode("<|eot_id|>", add_bos=False)) == 1


def test_filler_text_grows_and_round_trips() -> None:
    tok = Tokenizer(LLAMA)
    assert tok.filler_text(3) == " tok0 tok1 tok2"
    assert tok.filler_text(4).startswith(tok.filler_text(3))
    assert tok.encode(tok.filler_text(500), add_bos=False) == tok.filler_ids(500)
    for n in (0, 1, 2, 300, 5000):
        assert json.loads(tok.filler_ids_json(n)) == tok.filler_ids(n)
        assert json.loads(f'"{tok.filler_text(n)}"') == tok.filler_text(n)  # JSON-safe as it is


def test_first_stop_string_and_token() -> None:
    tok = Tokenizer(LLAMA)
    assert tok.first_stop([" tok3"], [], 0, 100) == (4, " tok3")
    assert tok.first_stop(["tok2 tok"], [], 0, 100) == (4, "tok2 tok")  # spans two tokens
    assert tok.first_stop([" tok3"], [], 0, 3) is None  # beyond max_new_tokens
    assert tok.first_stop([" tok1"], [], 5, 100) == (11, " tok1")  # " tok10", the 11th token, matches first
    stop_id = tok.filler_ids(8)[7]
    assert tok.first_stop([], [stop_id], 0, 100) == (8, stop_id)
    assert tok.first_stop([" tok9"], [stop_id], 0, 100) == (8, stop_id)


def test_chat_templates() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]
    llama = render_chat(LLAMA, msgs)
    assert llama.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>" in llama
    assert render_chat(QWEN, msgs).endswith("<|im_start|>assistant\n")


def test_sampling_defaults() -> None:
    p = parse_sampling_params(None)
    assert p.max_new_tokens == DEFAULT_MAX_NEW_TOKENS and p.stop == () and p.min_new_tokens == 0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": -0.5}, "temperature must be non-negative"),
        ({"top_p": 0.0}, "top_p must be in (0, 1]"),
        ({"top_k": 0}, "top_k must be -1"),
        ({"max_new_tokens": -1}, "max_new_tokens must be at least 0"),
        ({"max_new_tokens": 4, "min_new_tokens": 5}, "min_new_tokens must be in [0, max_new_tokens]"),
        ({"repetition_penalty": 3.0}, "repetition_penalty must be in [0, 2]"),
        ({"max_new_tokens": "many"}, "max_new_tokens must be an integer"),
        ({"stop": 3}, "stop must be a string or a list of strings"),
        ({"bogus": 1}, "Unknown sampling parameters: bogus"),
    ],
)
def test_sampling_rejects_like_sglang(params: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_sampling_params(params)


def test_generated_tokens_have_a_reserved_id_range_and_decode() -> None:
    tok = Tokenizer(LLAMA)
    ids = tok.filler_ids(40)
    assert ids == [LLAMA.filler_base + n for n in range(40)]
    assert all(tok.filler_index(t) == n for n, t in enumerate(ids))
    assert tok.decode(ids) == tok.filler_text(40)
    words = tok.encode("no word of this text lands in the filler range", add_bos=False)
    assert all(tok.filler_index(t) is None for t in words)


def test_decode_skips_specials_and_names_ids_it_never_produced() -> None:
    tok = Tokenizer(LLAMA)
    ids = tok.encode("The capital of France is")
    assert ids[0] == 128000
    assert tok.decode(ids) == "The capital of France is"
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>The capital of France is"
    assert tok.token_text(128009) == "<|eot_id|>"
    assert Tokenizer(LLAMA).token_text(ids[1]) == f"<id:{ids[1]}>"  # a fresh tokenizer never gave that id


def test_first_stop_regex() -> None:
    tok = Tokenizer(LLAMA)
    assert tok.first_stop([], [], 0, 100, [r"tok1[0-9]"]) == (11, r"tok1[0-9]")  # bisection path
    assert tok.first_stop([], [], 0, 100, [r"tok5$"]) == (6, r"tok5$")  # `$`: at the end of the text so far
    assert tok.first_stop([], [], 0, 100, [r"tok5\d$"]) == (51, r"tok5\d$")
    assert tok.first_stop([" tok3"], [], 0, 100, [r"tok1\b"]) == (2, r"tok1\b")  # the earlier match wins
    assert tok.first_stop([], [], 0, 100, [r"and|or"]) is None
    assert tok.first_stop([], [], 20, 100, [r"tok1 "]) == (20, r"tok1 ")  # not before min_new_tokens


def test_sampling_n_and_stop_regex_are_validated() -> None:
    p = parse_sampling_params({"n": 3, "stop_regex": r"tok\d+"})
    assert p.n == 3 and p.stop_regex == (r"tok\d+",)
    for bad, message in [({"n": 0}, "n must be in [1, 128]"), ({"n": 129}, "n must be in [1, 128]"),
                         ({"stop_regex": "(unclosed"}, "is not a valid regular expression"),
                         ({"stop": ["x"] * 65}, "stop may hold at most 64 entries"),
                         ({"stop_regex": "x" * 1025}, "stop_regex may hold at most 64 entries of at most 1024")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_sampling_params(bad)
