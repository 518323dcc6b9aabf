"""A cheap deterministic stand-in for a model's tokenizer, and the filler text the emulator "generates".

Tokenization: the text is cut into pieces by one regular expression, in this order of preference:
a special token such as `<|eot_id|>` (whitespace before one is a piece of its own), a word with the
whitespace before it (" hello"), one punctuation character with the whitespace before it (" ,"), or a
run of trailing whitespace. The model's own special
tokens (`ModelCard.special_tokens`) get their real ids; any other piece's id is its xxhash64 modulo the
card's `filler_base`, so equal texts give equal ids and a shared text prefix gives a shared id prefix
(up to the piece that straddles the divergence point) - which is all the prefix cache needs. Text
prompts get the model's BOS id in front, as the Hugging Face tokenizers of the served models do;
`input_ids` are taken as they are. About one token per word: "word1 word2" is
[BOS, id("word1"), id(" word2")].

Generated text: output token n (0-based) is the piece " tok{n}", whose id is `filler_base + n % FILLER_IDS`
(a range no other piece maps to), so cumulative text grows token by token, re-tokenizing an answer
gives back its ids, and the id of a generated token says which one it is (`filler_index`). The filler
is plain ASCII without quotes or backslashes, so it can be put into JSON as it is.

Decoding: a filler or special id decodes to its text; any other id to the last piece this tokenizer
gave that id (it remembers a bounded number), or, for an id it never produced, to `<id:N>`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

import regex
import xxhash

from sim.emulator.model_card import FILLER_IDS, ModelCard

_SPECIAL = r"<\|[A-Za-z0-9_]+\|>"
_PIECE = re.compile(rf"{_SPECIAL}|\s+(?={_SPECIAL})|\s*\w+|\s*[^\w\s]|\s+")
_FILLER_PIECE = re.compile(r" tok(0|[1-9][0-9]{0,8})")
_CACHE_LIMIT = 1 << 18
REGEX_WINDOW_CHARS = 1024  # a stop_regex is searched in this much of the end of the text
REGEX_BUDGET_S = 0.25  # the most time spent looking for where a request's stop_regex matches
_END_SENSITIVE = ("$", "\\Z", "\\b", "\\B", "(?=", "(?!")  # constructs that look at where the text ends


class Tokenizer:
    """Deterministic text -> token ids for one model card, plus the filler the emulator emits."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.vocab = card.vocab
        self.filler_base = card.filler_base
        self._special_texts = {i: t for t, i in card.special_tokens.items()}
        self._ids: dict[str, int] = dict(card.special_tokens)
        self._pieces: dict[int, str] = {}  # id -> the last hashed piece given that id
        self._regex_stops: dict[tuple[tuple[str, ...], int, int], tuple[int, str] | None] = {}
        self._filler_text = ""
        self._filler_offsets: list[int] = [0]  # char offset where filler token n starts
        self._filler_ids: list[int] = []
        self._filler_ids_csv = ""  # the filler ids joined by commas, for building JSON arrays by slicing
        self._filler_csv_ends: list[int] = [0]  # length of the csv holding the first n ids

    def piece_id(self, piece: str) -> int:
        """Token id of one piece."""
        tid = self._ids.get(piece)
        if tid is None:
            if len(self._ids) >= _CACHE_LIMIT:
                self._ids = dict(self.card.special_tokens)
                self._pieces.clear()
            filler = _FILLER_PIECE.fullmatch(piece)
            if filler is not None:
                tid = self.filler_base + int(filler.group(1)) % FILLER_IDS
            else:
                tid = xxhash.xxh64_intdigest(piece.encode()) % self.filler_base
                self._pieces[tid] = piece
            self._ids[piece] = tid
        return tid

    def pieces(self, text: str) -> list[str]:
        """The pieces a text is cut into (their concatenation is the text)."""
        return _PIECE.findall(text)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of a text; the model's BOS first when `add_bos` and the model has one."""
        ids = [self.piece_id(p) for p in _PIECE.findall(text)]
        if add_bos and self.card.bos_token_id is not None:
            ids.insert(0, self.card.bos_token_id)
        return ids

    # ---- decoding ------------------------------------------------------------------------------

    def filler_index(self, token_id: int) -> int | None:
        """n (modulo FILLER_IDS) if `token_id` is the id of generated token n, else None."""
        n = token_id - self.filler_base
        return n if 0 <= n < FILLER_IDS else None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_texts

    def token_text(self, token_id: int) -> str:
        """The text of one token id."""
        n = self.filler_index(token_id)
        if n is not None:
            return f" tok{n}"
        text = self._special_texts.get(token_id)
        if text is None:
            text = self._pieces.get(token_id)
        return f"<id:{token_id}>" if text is None else text

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of a token sequence (special tokens left out when `skip_special_tokens`)."""
        return "".join(self.token_text(t) for t in ids if not (skip_special_tokens and self.is_special(t)))

    # ---- filler output -------------------------------------------------------------------------

    def _grow_filler(self, n: int) -> None:
        have = len(self._filler_ids)
        if n <= have:
            return
        n = max(n, 2 * have, 256)
        pieces = [f" tok{i}" for i in range(have, n)]
        offsets = self._filler_offsets
        pos = offsets[-1]
        for p in pieces:
            pos += len(p)
            offsets.append(pos)
        base = self.filler_base
        new_ids = [base + i % FILLER_IDS for i in range(have, n)]
        self._filler_ids.extend(new_ids)
        self._filler_text += "".join(pieces)
        ends = self._filler_csv_ends
        end = ends[-1]
        for tid in new_ids:
            end += len(str(tid)) + (1 if end else 0)
            ends.append(end)
        self._filler_ids_csv += ("," if self._filler_ids_csv else "") + ",".join(map(str, new_ids))

    def filler_text(self, n: int) -> str:
        """Concatenated text of the first `n` generated tokens."""
        self._grow_filler(n)
        return self._filler_text[: self._filler_offsets[n]]

    def filler_ids(self, n: int) -> list[int]:
        """Ids of the first `n` generated tokens."""
        self._grow_filler(n)
        return self._filler_ids[:n]

    def filler_ids_json(self, n: int) -> str:
        """The JSON array of the first `n` generated ids, by slicing a precomputed string."""
        self._grow_filler(n)
        return "[" + self._filler_ids_csv[: self._filler_csv_ends[n]] + "]"

    def filler_token_covering(self, char_end: int) -> int:
        """Number of filler tokens needed for the filler text to reach `char_end` characters."""
        lo, hi = 0, len(self._filler_ids)
        offsets = self._filler_offsets
        while lo < hi:  # smallest n with offsets[n] >= char_end
            mid = (lo + hi) // 2
            if offsets[mid] >= char_end:
                hi = mid
            else:
                lo = mid + 1
        return lo

    def first_stop(self, stops: Sequence[str], stop_token_ids: Sequence[int], min_tokens: int,
                   max_tokens: int, stop_regexes: Sequence[str] = ()) -> tuple[int, str | int] | None:
        """Where generation stops on a stop string, stop token or stop regex before `max_tokens` tokens.

        Returns (number of tokens generated, the matched string, token id or regex pattern) for the
        earliest match that ends at token `min_tokens` or later, or None when nothing matches.
        """
        if max_tokens <= 0 or not (stops or stop_token_ids or stop_regexes):
            return None
        self._grow_filler(max_tokens)
        text_end = self._filler_offsets[max_tokens]
        min_end = self._filler_offsets[max(min_tokens, 1) - 1] + 1  # the match must end in token >= min
        best: tuple[int, str | int] | None = None
        for s in stops:
            if not s:
                continue
            pos = self._filler_text.find(s, max(0, min_end - len(s)), text_end)
            if pos < 0:
                continue
            n = self.filler_token_covering(pos + len(s))
            if best is None or n < best[0]:
                best = (n, s)
        if stop_regexes:
            found = self._first_regex_stop(tuple(stop_regexes), min_tokens, best[0] - 1 if best else max_tokens)
            if found is not None:
                best = found
        wanted = set(stop_token_ids)
        if wanted:
            limit = best[0] - 1 if best else max_tokens
            for i in range(max(min_tokens, 1) - 1, limit):
                if self._filler_ids[i] in wanted:
                    best = (i + 1, self._filler_ids[i])
                    break
        return best

    def _first_regex_stop(self, patterns: tuple[str, ...], min_tokens: int,
                          max_tokens: int) -> tuple[int, str] | None:
        """The first n in [max(min_tokens, 1), max_tokens] at which a pattern matches the text of n
        tokens, as SGLang checks after every token (`$` matching at the end of the text so far).

        A pattern that cannot depend on where the text ends matches in n tokens iff it matches in more,
        so the first such n is found by bisection; one that can (`$`, `\\Z`, `\\b`, `\\B`, a
        lookahead) is tried token by token over the last REGEX_WINDOW_CHARS characters. Results are
        cached (the filler is the same for every request); a search that takes longer than
        REGEX_BUDGET_S is a ValueError, so that a pathological pattern cannot stall the server."""
        key = (patterns, min_tokens, max_tokens)
        if key in self._regex_stops:
            return self._regex_stops[key]
        deadline = time.perf_counter() + REGEX_BUDGET_S
        first = max(min_tokens, 1)
        found: tuple[int, str] | None = None
        try:
            for pattern in patterns:
                limit = found[0] - 1 if found else max_tokens
                n = self._regex_first_end(regex.compile(pattern), first, limit, deadline)
                if n is not None:
                    found = (n, pattern)
        except TimeoutError:
            raise ValueError(f"stop_regex took longer than {REGEX_BUDGET_S} s to evaluate.") from None
        if len(self._regex_stops) >= 256:
            self._regex_stops.clear()
        self._regex_stops[key] = found
        return found

    def _regex_first_end(self, compiled: regex.Pattern[str], first: int, last: int, deadline: float) -> int | None:
        text = self._filler_text
        offsets = self._filler_offsets

        def matches(n: int, start: int = 0) -> bool:
            budget = max(deadline - time.perf_counter(), 1e-6)
            return compiled.search(text, start, offsets[n], timeout=budget) is not None

        if first > last:
            return None
        if any(a in compiled.pattern for a in _END_SENSITIVE):
            for n in range(first, last + 1):
                if matches(n, max(0, offsets[n] - REGEX_WINDOW_CHARS)):
                    return n
            return None
        if not matches(last):
            return None
        lo, hi = first, last  # the answer is in [lo, hi]
        while lo < hi:
            mid = (lo + hi) // 2
            if matches(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo


def render_chat(card: ModelCard, messages: Sequence[Mapping[str, Any]]) -> str:
    """The prompt text of a chat in the model's template, ending with the assistant's turn header.

    Message content is a string or a list of OpenAI content parts, whose `text` parts are joined.
    Llama 3 uses its header/eot tokens (the BOS is added by the tokenizer); Qwen uses ChatML.
    """
    out: list[str] = []
    for m in messages:
        role = str(m.get("role", "user"))
        content = m.get("content")
        if isinstance(content, list):
            text = "".join(str(p.get("text", "")) for p in content if isinstance(p, Mapping))
        else:
            text = "" if content is None else str(content)
        if card.chat_format == "llama3":
            out.append(f"<|start_header_id|>{role}<|end_header_id|>\n\n{text}<|eot_id|>")
        else:
            out.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    out.append("<|start_header_id|>assistant<|end_header_id|>\n\n" if card.chat_format == "llama3"
               else "<|im_start|>assistant\n")
    return "".join(out)
