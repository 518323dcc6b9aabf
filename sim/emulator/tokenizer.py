"""A cheap deterministic stand-in for a model's tokenizer, and the filler text the emulator "generates".

Tokenization: the text is cut into pieces by one regular expression, in this order of preference:
a special token such as `<|eot_id|>`, a word with the whitespace before it (" hello"), one punctuation
character with the whitespace before it (" ,"), or a run of trailing whitespace. A piece's token id is
its xxhash64 modulo the vocabulary size, so equal texts give equal ids and a shared text prefix gives
a shared id prefix (up to the piece that straddles the divergence point) — which is all the prefix
cache needs. Text prompts get the model's BOS id in front, as the Hugging Face tokenizers of the
served models do; `input_ids` are taken as they are. About one token per word: "word1 word2" is
[BOS, id("word1"), id(" word2")].

Generated text: output token n (0-based) is the piece " tok{n}", with the id the tokenizer gives that
piece, so cumulative text grows token by token and re-tokenizing an answer gives back its ids. The
filler is plain ASCII without quotes or backslashes, so it can be put into JSON as it is.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import xxhash

from sim.emulator.model_card import ModelCard

_PIECE = re.compile(r"<\|[A-Za-z0-9_]+\|>|\s*\w+|\s*[^\w\s]|\s+")
_CACHE_LIMIT = 1 << 18


class Tokenizer:
    """Deterministic text -> token ids for one model card, plus the filler the emulator emits."""

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.vocab = card.vocab
        self._ids: dict[str, int] = {}
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
                self._ids.clear()
            tid = xxhash.xxh64_intdigest(piece.encode()) % self.vocab
            self._ids[piece] = tid
        return tid

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of a text; the model's BOS first when `add_bos` and the model has one."""
        ids = [self.piece_id(p) for p in _PIECE.findall(text)]
        if add_bos and self.card.bos_token_id is not None:
            ids.insert(0, self.card.bos_token_id)
        return ids

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
        new_ids = [self.piece_id(p) for p in pieces]
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
                   max_tokens: int) -> tuple[int, str | int] | None:
        """Where generation stops on a stop string or stop token before `max_tokens` tokens.

        Returns (number of tokens generated, the matched string or token id) for the earliest match
        that ends at token `min_tokens` or later, or None when nothing matches.
        """
        if max_tokens <= 0 or not (stops or stop_token_ids):
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
        wanted = set(stop_token_ids)
        if wanted:
            limit = best[0] - 1 if best else max_tokens
            for i in range(max(min_tokens, 1) - 1, limit):
                if self._filler_ids[i] in wanted:
                    best = (i + 1, self._filler_ids[i])
                    break
        return best


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
