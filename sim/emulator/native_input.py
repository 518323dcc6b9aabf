"""SGLang's native `/generate` body (GenerateReqInput), normalized into one request per prompt.

A body holds one prompt (`text` a string, `input_ids` a list of ints) or a batch (`text` a list of
strings, `input_ids` a list of lists). The per-request options (`sampling_params`, `rid`,
`return_logprob`, `logprob_start_len`, `top_logprobs_num`, `token_ids_logprob`) are either one value
for every prompt or, in a batch, a list with one value per prompt, as in SGLang's
`normalize_batch_and_arguments`. `cache_salt` / `extra_key` (a string) keep the request's prefix cache
apart from that of requests with another value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sim.emulator.emulator import LogprobOptions

_PER_PROMPT = ("sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num")


@dataclass(frozen=True, slots=True)
class GenerateInput:
    """A validated `/generate` body."""

    texts: list[str] | None  # one per prompt, or None when the prompts are token ids
    input_ids: list[Any] | None  # one id list per prompt (validated further by Emulator.prepare)
    sampling_params: list[Any]  # one per prompt
    logprobs: list[LogprobOptions | None]  # one per prompt
    rids: list[str] | None  # one per prompt, when the client named them
    batch: bool  # the prompts came as a list: the answer is a list too
    cache_salt: str | None

    @property
    def size(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.input_ids or [])


def parse_generate_body(body: dict[str, Any], vocab: int) -> GenerateInput:
    """Normalize a `/generate` body; ValueError (with SGLang's message where it has one) when malformed."""
    text, ids = body.get("text"), body.get("input_ids")
    if text is None and ids is None:
        raise ValueError("Either text, input_ids or input_embeds should be provided.")
    texts: list[str] | None = None
    id_lists: list[Any] | None = None
    if ids is not None:  # SGLang uses input_ids when both are given
        batch = isinstance(ids, list) and bool(ids) and isinstance(ids[0], list)
        id_lists = ids if batch else [ids]
    else:
        batch = isinstance(text, list)
        texts = text if batch else [text]
        if not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a list of strings.")
    size = len(texts) if texts is not None else len(id_lists or [])
    if size == 0:
        raise ValueError("The batch of prompts is empty.")

    def per_prompt(key: str, default: Any) -> list[Any]:
        value = body.get(key, default)
        if batch and isinstance(value, list) and key != "token_ids_logprob":
            if len(value) != size:
                raise ValueError(f"{key} has {len(value)} entries for {size} prompts.")
            return value
        if key == "rid" and batch and value is not None:
            raise ValueError("The rid should be a list for batch processing.")
        return [value] * size

    params, rids, want, starts, tops = (per_prompt(k, d) for k, d in zip(
        _PER_PROMPT, (None, None, False, -1, 0), strict=True))
    token_ids = body.get("token_ids_logprob")
    id_sets = token_ids if batch and isinstance(token_ids, list) and token_ids and isinstance(token_ids[0], list) \
        else [token_ids] * size
    if len(id_sets) != size:
        raise ValueError(f"token_ids_logprob has {len(id_sets)} entries for {size} prompts.")
    text_in_logprobs = body.get("return_text_in_logprobs", False)
    logprobs = [LogprobOptions.parse(w, s, t, i, text_in_logprobs, vocab)
                for w, s, t, i in zip(want, starts, tops, id_sets, strict=True)]
    if any(r is not None and not isinstance(r, str) for r in rids):
        raise ValueError("rid must be a string (or, for a batch, a list of strings).")
    named = all(r is not None for r in rids)
    salt = body.get("cache_salt") or body.get("extra_key")
    if salt is not None and not isinstance(salt, str):
        raise ValueError("cache_salt must be a string.")
    return GenerateInput(texts=texts, input_ids=id_lists, sampling_params=params, logprobs=logprobs,
                         rids=rids if named else None, batch=batch, cache_salt=salt)
