"""Synthetic but consistent log-probabilities for the emulator's output (and its prompts).

There is no model, so the emulator makes one up: a bigram model over token ids whose values depend only
on the server's seed, the previous token and the token, computed with a vectorized integer hash
(splitmix64). After any token the most likely next token (its "successor") is the next filler token:
after generated token n comes n + 1, after anything else generated token 0. So the emulator's greedy
output is the model's greedy output, and:

* at every output position the sampled token is the top-1 entry of the top logprobs (for the first
  output token this holds unless the prompt itself ends with a filler token);
* the top list is sorted, every value is < 0, and the probabilities of the top-1 and the listed
  alternatives (MAX_TOP_LOGPROBS distinct filler tokens after it) sum to less than 1;
* rescoring a prompt that contains an earlier answer gives that answer's tokens the logprobs they
  were generated with (SGLang's `test_logprob_match`), since both come from the same (previous, token)
  pair; the logprob of any token after any other is defined, so input logprobs, `token_ids_logprob`
  and /v1/score all read the same function.

Logprobs cost no emulated time: SGLang's extra GPU work for input logprobs is not modelled.
"""

from __future__ import annotations

import numpy as np

from sim.emulator.model_card import FILLER_IDS
from sim.emulator.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20  # alternatives per position; also the bound on top_logprobs_num (OpenAI's limit)

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_M1 = _U64(0xBF58476D1CE4E5B9)
_M2 = _U64(0x94D049BB133111EB)
_TOKEN_SALT = _U64(0xD6E8FEB86659FD93)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer, elementwise over uint64 (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> _U64(30))) * _M1
    z = (z ^ (z >> _U64(27))) * _M2
    return z ^ (z >> _U64(31))


def _unit(x: np.ndarray) -> np.ndarray:
    """uint64 hashes -> floats in [0, 1)."""
    return (x >> _U64(11)).astype(np.float64) * 2.0**-53


class LogprobModel:
    """The bigram model of one emulated server (seeded by its seed), for one tokenizer's filler range."""

    def __init__(self, filler_base: int, seed: int) -> None:
        self.filler_base = filler_base
        self._seed = _mix(np.asarray([seed], dtype=np.uint64))[0]

    def _keys(self, prev: np.ndarray) -> np.ndarray:
        return _mix(prev.astype(np.uint64) ^ self._seed)

    def successors(self, prev: np.ndarray) -> np.ndarray:
        """The most likely next token after each of `prev`."""
        n = prev.astype(np.int64) - self.filler_base
        is_filler = (n >= 0) & (n < FILLER_IDS)
        return self.filler_base + np.where(is_filler, (n + 1) % FILLER_IDS, 0)

    def top(self, prev: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k most likely tokens after each of `prev`, best first: (ids, logprobs), each (len(prev), k)."""
        if not 0 <= k <= MAX_TOP_LOGPROBS + 1:
            raise ValueError(f"k must be in [0, {MAX_TOP_LOGPROBS + 1}]")
        prev = np.asarray(prev, dtype=np.int64)
        keys = self._keys(prev)
        p_top = self._p_top(keys)
        succ_n = self.successors(prev) - self.filler_base
        start = (keys % _U64(FILLER_IDS - 1)).astype(np.int64)
        ranks = np.arange(max(k - 1, 0))
        offsets = (start[:, None] + 2 * ranks[None, :]) % (FILLER_IDS - 1)
        alt_ids = self.filler_base + (succ_n[:, None] + 1 + offsets) % FILLER_IDS  # distinct, never the successor
        alt = self._alt_logprob(keys[:, None], p_top[:, None], ranks[None, :])
        ids = np.concatenate([(self.filler_base + succ_n)[:, None], alt_ids], axis=1)[:, :k]
        values = np.concatenate([np.log(p_top)[:, None], alt], axis=1)[:, :k]
        return ids, values

    def logprobs(self, prev: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """log P(tokens[i] | prev[i]) for each i."""
        prev = np.asarray(prev, dtype=np.int64)
        tokens = np.asarray(tokens, dtype=np.int64)
        keys = self._keys(prev)
        p_top = self._p_top(keys)
        succ_n = self.successors(prev) - self.filler_base
        start = (keys % _U64(FILLER_IDS - 1)).astype(np.int64)
        n = tokens - self.filler_base
        off = (n - succ_n - 1) % FILLER_IDS  # FILLER_IDS - 1 for the successor itself
        d = (off - start) % (FILLER_IDS - 1)
        rank = d // 2
        is_alt = (n >= 0) & (n < FILLER_IDS) & (off < FILLER_IDS - 1) & (d % 2 == 0) & (rank < MAX_TOP_LOGPROBS)
        is_top = (n >= 0) & (n < FILLER_IDS) & (off == FILLER_IDS - 1)
        alt = self._alt_logprob(keys, p_top, np.minimum(rank, MAX_TOP_LOGPROBS - 1))
        last = self._alt_logprob(keys, p_top, np.full_like(rank, MAX_TOP_LOGPROBS - 1))
        tail_u = _unit(_mix(keys ^ _mix(tokens.astype(np.uint64) * _TOKEN_SALT)))
        tail = last - 1.0 - 10.0 * tail_u  # below every listed alternative
        return np.where(is_top, np.log(p_top), np.where(is_alt, alt, tail))

    @staticmethod
    def _p_top(keys: np.ndarray) -> np.ndarray:
        """Probability of the successor: 0.5 .. 0.95."""
        return 0.5 + 0.45 * _unit(_mix(keys))

    @staticmethod
    def _alt_logprob(keys: np.ndarray, p_top: np.ndarray, rank: np.ndarray) -> np.ndarray:
        """Alternative `rank` (0-based) has probability (1 - p_top) * 0.2 * 0.8^(rank + 1) * (0.85 .. 1.0),
        strictly decreasing in rank (0.85 > 0.8); together they hold less than 1 - p_top."""
        u = _unit(_mix(keys + (rank.astype(np.uint64) + _U64(1)) * _GOLDEN))
        return np.log(1.0 - p_top) + np.log(0.2) + (rank + 1) * np.log(0.8) + np.log(0.85 + 0.15 * u)


Entry = list  # [logprob | None, token id, text | None], as SGLang's meta_info carries them


class LogprobTables:
    """SGLang's per-token logprob entries for prompts and generated tokens, from one LogprobModel.

    The generated tokens are the same filler for every request, so their entries after the first one
    (whose previous token is the prompt's last) are computed once and kept, growing as needed."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.model = LogprobModel(tokenizer.filler_base, seed)
        self._chain = 0  # filler positions covered by the arrays below
        self._chain_ids = np.empty(0, dtype=np.int64)
        self._chain_lp = np.empty(0)
        self._chain_top_ids = np.empty((0, MAX_TOP_LOGPROBS + 1), dtype=np.int64)
        self._chain_top_lp = np.empty((0, MAX_TOP_LOGPROBS + 1))

    def _grow(self, n: int) -> None:
        if n <= self._chain:
            return
        n = max(n, 2 * self._chain, 256)
        ids = np.asarray(self.tokenizer.filler_ids(n), dtype=np.int64)
        prev = np.concatenate([ids[:1], ids[:-1]])  # position 0's entry is per request; a placeholder here
        self._chain_ids = ids
        self._chain_lp = self.model.logprobs(prev, ids)
        self._chain_top_ids, self._chain_top_lp = self.model.top(prev, MAX_TOP_LOGPROBS + 1)
        self._chain = n

    def output(self, last_prompt_id: int, lo: int, hi: int, top_n: int, token_ids: tuple[int, ...] | None,
               text: bool) -> tuple[list[Entry], list[list[Entry]] | None, list[list[Entry]] | None]:
        """Entries of generated tokens lo..hi-1: (token logprobs, top logprobs, requested-ids logprobs)."""
        self._grow(hi)
        ids = self._chain_ids[lo:hi]
        lp = self._chain_lp[lo:hi].copy()
        top_ids = self._chain_top_ids[lo:hi, :top_n].copy()
        top_lp = self._chain_top_lp[lo:hi, :top_n].copy()
        if lo > 0:
            prev = self._chain_ids[lo - 1:hi - 1]
        else:
            prev = np.concatenate([np.asarray([last_prompt_id], dtype=np.int64), self._chain_ids[:max(hi - 1, 0)]])
        if lo == 0 and hi > 0:  # the first generated token follows the prompt
            first = np.asarray([last_prompt_id])
            lp[0] = self.model.logprobs(first, ids[:1])[0]
            t_ids, t_lp = self.model.top(first, top_n)
            top_ids[0], top_lp[0] = t_ids[0], t_lp[0]
        tokens = self._entries(lp, ids, None, text)
        tops = self._top_entries(top_ids, top_lp, text) if top_n else None
        by_id = self._ids_entries(prev, token_ids, text) if token_ids is not None else None
        return tokens, tops, by_id

    def input(self, ids: list[int], texts: list[str] | None, start: int, top_n: int,
              token_ids: tuple[int, ...] | None, text: bool
              ) -> tuple[list[Entry], list[list[Entry] | None] | None, list[list[Entry] | None] | None]:
        """Entries of prompt positions start..len(ids)-1; position 0 has no logprob (None)."""
        arr = np.asarray(ids[start:], dtype=np.int64)
        prev = np.asarray(ids[max(start - 1, 0):len(ids) - 1], dtype=np.int64)
        skip = 1 if start == 0 else 0  # position 0 has nothing before it
        lp = np.full(len(arr), np.nan)
        if len(arr) > skip:
            lp[skip:] = self.model.logprobs(prev, arr[skip:])
        tokens = self._entries(lp, arr, texts[start:] if texts is not None else None, text)
        tops: list[list[Entry] | None] | None = None
        if top_n:
            t_ids, t_lp = self.model.top(prev, top_n)
            tops = [None] * skip + self._top_entries(t_ids, t_lp, text)
        by_id: list[list[Entry] | None] | None = None
        if token_ids is not None:
            by_id = [None] * skip + self._ids_entries(prev, token_ids, text)
        return tokens, tops, by_id

    def _entries(self, lp: np.ndarray, ids: np.ndarray, texts: list[str] | None, text: bool) -> list[Entry]:
        token_text = self.tokenizer.token_text
        values = [None if v != v else v for v in lp.tolist()]  # NaN -> None
        id_list = ids.tolist()
        if not text:
            return [[v, i, None] for v, i in zip(values, id_list, strict=True)]
        names = texts if texts is not None else [token_text(i) for i in id_list]
        return [[v, i, t] for v, i, t in zip(values, id_list, names, strict=True)]

    def _top_entries(self, ids: np.ndarray, lp: np.ndarray, text: bool) -> list[list[Entry]]:
        token_text = self.tokenizer.token_text
        return [[[v, i, token_text(i) if text else None] for v, i in zip(row_lp, row_ids, strict=True)]
                for row_lp, row_ids in zip(lp.tolist(), ids.tolist(), strict=True)]

    def _ids_entries(self, prev: np.ndarray, token_ids: tuple[int, ...], text: bool) -> list[list[Entry]]:
        if not len(prev):
            return []
        wanted = np.asarray(token_ids, dtype=np.int64)
        lp = self.model.logprobs(np.repeat(prev, len(wanted)), np.tile(wanted, len(prev))).reshape(len(prev), -1)
        return self._top_entries(np.tile(wanted, (len(prev), 1)), lp, text)
