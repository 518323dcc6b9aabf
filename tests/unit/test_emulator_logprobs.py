"""The emulator's synthetic logprobs: a consistent bigram model over token ids."""

from __future__ import annotations

import numpy as np
import pytest

from sim.emulator.logprobs import MAX_TOP_LOGPROBS, LogprobModel, LogprobTables
from sim.emulator.model_card import model_card
from sim.emulator.tokenizer import Tokenizer

LLAMA = model_card("llama-3.1-8b")


def test_top_lists_are_sorted_negative_and_led_by_the_next_filler() -> None:
    model = LogprobModel(LLAMA.filler_base, seed=0)
    tok = Tokenizer(LLAMA)
    prev = np.asarray([5, 77_777, *tok.filler_ids(300)], dtype=np.int64)
    ids, lp = model.top(prev, MAX_TOP_LOGPROBS + 1)
    assert (lp < 0).all() and (np.diff(lp, axis=1) < 0).all()
    assert (np.exp(lp).sum(axis=1) < 1).all()
    assert list(ids[:2, 0]) == [tok.filler_ids(1)[0]] * 2  # after a prompt token: generated token 0
    assert list(ids[2:, 0]) == tok.filler_ids(301)[1:]  # after generated token n: n + 1
    assert all(len(set(row)) == len(row) for row in ids.tolist())


def test_every_pair_reads_the_same_value_whichever_way_it_is_asked() -> None:
    model = LogprobModel(LLAMA.filler_base, seed=3)
    prev = np.arange(0, 128_000, 997, dtype=np.int64)
    ids, lp = model.top(prev, MAX_TOP_LOGPROBS + 1)
    for j in range(MAX_TOP_LOGPROBS + 1):
        assert np.allclose(model.logprobs(prev, ids[:, j]), lp[:, j])
    others = model.logprobs(prev, prev)  # not in the top lists (a token rarely follows itself here)
    assert (others[~(ids == prev[:, None]).any(axis=1)] < lp[~(ids == prev[:, None]).any(axis=1), -1]).all()


def test_seed_changes_values_not_the_greedy_path() -> None:
    a, b = LogprobModel(LLAMA.filler_base, 0), LogprobModel(LLAMA.filler_base, 1)
    prev = np.asarray([1, 2, 3], dtype=np.int64)
    assert (a.top(prev, 1)[0] == b.top(prev, 1)[0]).all()
    assert not np.allclose(a.top(prev, 1)[1], b.top(prev, 1)[1])


def test_rescoring_prompt_plus_answer_gives_the_answers_logprobs() -> None:
    """SGLang's test_logprob_match: the input logprobs of prompt + output equal the output logprobs."""
    tok = Tokenizer(LLAMA)
    tables = LogprobTables(tok, seed=0)
    prompt = tok.encode("I have a very good idea on how to")
    out, tops, _ = tables.output(prompt[-1], 0, 64, 5, None, True)
    rescored, _, _ = tables.input(prompt + tok.filler_ids(64), None, 0, 0, None, True)
    assert [e[0] for e in rescored[len(prompt):]] == pytest.approx([e[0] for e in out])
    assert "".join(e[2] for e in out) == tok.filler_text(64)
    assert all(row[0] == e for row, e in zip(tops, out, strict=True))  # top-1 is the sampled token


def test_input_entries_start_where_asked_and_the_first_position_has_no_logprob() -> None:
    tok = Tokenizer(LLAMA)
    tables = LogprobTables(tok, seed=0)
    text = "Today is a sunny day and"
    ids = tok.encode(text)
    texts = ["<|begin_of_text|>", *tok.pieces(text)]
    tokens, tops, by_id = tables.input(ids, texts, 0, 3, (7, 9), True)
    assert tokens[0] == [None, ids[0], "<|begin_of_text|>"] and tops[0] is None and by_id[0] is None
    assert [e[1] for e in tokens] == ids and "".join(e[2] for e in tokens[1:]) == text
    assert all(len(row) == 3 for row in tops[1:]) and all([e[1] for e in row] == [7, 9] for row in by_id[1:])
    tail, _, _ = tables.input(ids, None, 4, 0, None, False)
    assert len(tail) == len(ids) - 4 and all(e[2] is None for e in tail)
    assert [e[0] for e in tail] == pytest.approx([e[0] for e in tokens[4:]])
