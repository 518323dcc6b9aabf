"""SGLang's `sampling_params`: the accepted keys, their defaults and SGLang's validation messages.

The emulator does not sample, but it must accept and reject exactly what SGLang does, and the
length-related parameters (max_new_tokens, min_new_tokens, stop, stop_token_ids, stop_regex) decide how
long the emulated generation runs. Errors are `ValueError`s whose text is SGLang's, which the server
turns into SGLang's 400 responses. Where SGLang sets no bound the emulator sets one (MAX_N,
MAX_STOP_ITEMS, MAX_STOP_CHARS), so that one request cannot ask for unbounded work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import regex

DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's SamplingParams default
MAX_N = 128  # parallel samples per prompt (SGLang has no limit)
MAX_STOP_ITEMS = 64  # stop strings, stop regexes and stop token ids, each (SGLang has no limit)
MAX_STOP_CHARS = 1024  # length of one stop string or stop regex (SGLang has no limit)

_NUMBER_DEFAULTS: dict[str, float] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": -1,
    "min_p": 0.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
}
_OTHER_KEYS = frozenset({
    "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim", "n",
    "json_schema", "regex", "ebnf", "structural_tag", "custom_params", "stream_interval",
    "logit_bias", "sampling_seed", "stop_regex",
})
KNOWN_KEYS = frozenset(_NUMBER_DEFAULTS) | _OTHER_KEYS | {
    "max_new_tokens", "min_new_tokens", "stop", "stop_token_ids",
}


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """The validated parameters that shape an emulated generation."""

    max_new_tokens: int
    min_new_tokens: int
    stop: tuple[str, ...]
    stop_token_ids: tuple[int, ...]
    stop_regex: tuple[str, ...]
    no_stop_trim: bool
    n: int


def _number(params: dict[str, Any], key: str) -> float:
    value = params.get(key)
    if value is None:
        return _NUMBER_DEFAULTS[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{key} must be a number, got {value!r}.")
    return float(value)


def _int_or_none(params: dict[str, Any], key: str) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{key} must be an integer, got {value!r}.")
    return value


def parse_sampling_params(raw: Any, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> SamplingParams:
    """Validate a `sampling_params` object as SGLang's SamplingParams.verify does."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"sampling_params must be an object, got {type(raw).__name__}.")
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"Unknown sampling parameters: {', '.join(unknown)}.")
    temperature = _number(raw, "temperature")
    top_p = _number(raw, "top_p")
    top_k = _number(raw, "top_k")
    min_p = _number(raw, "min_p")
    if temperature < 0.0:
        raise ValueError(f"temperature must be non-negative, got {temperature}.")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if not 0.0 <= min_p <= 1.0:
        raise ValueError(f"min_p must be in [0, 1], got {min_p}.")
    if top_k < 1 and top_k != -1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {int(top_k)}.")
    for key in ("frequency_penalty", "presence_penalty"):
        v = _number(raw, key)
        if not -2.0 <= v <= 2.0:
            raise ValueError(f"{key} must be in [-2, 2], got {v}.")
    rep = _number(raw, "repetition_penalty")
    if not 0.0 <= rep <= 2.0:
        raise ValueError(f"repetition_penalty must be in [0, 2], got {rep}.")
    max_new = _int_or_none(raw, "max_new_tokens")
    max_new = default_max_new_tokens if max_new is None else max_new
    if max_new < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {max_new}.")
    min_new = _int_or_none(raw, "min_new_tokens") or 0
    if not 0 <= min_new <= max_new:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens], got {min_new}.")
    n = _int_or_none(raw, "n")
    n = 1 if n is None else n
    if not 1 <= n <= MAX_N:
        raise ValueError(f"n must be in [1, {MAX_N}], got {n}.")
    stops = _strings(raw.get("stop"), "stop")
    stop_regex = _strings(raw.get("stop_regex"), "stop_regex")
    for pattern in stop_regex:
        try:
            regex.compile(pattern)
        except regex.error as exc:
            raise ValueError(f"stop_regex {pattern!r} is not a valid regular expression: {exc}.") from None
    stop_ids = raw.get("stop_token_ids") or []
    if not isinstance(stop_ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in stop_ids):
        raise ValueError(f"stop_token_ids must be a list of integers, got {stop_ids!r}.")
    if len(stop_ids) > MAX_STOP_ITEMS:
        raise ValueError(f"stop_token_ids may hold at most {MAX_STOP_ITEMS} ids.")
    return SamplingParams(
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        stop=stops,
        stop_token_ids=tuple(stop_ids),
        stop_regex=stop_regex,
        no_stop_trim=bool(raw.get("no_stop_trim", False)),
        n=n,
    )


def _strings(value: Any, key: str) -> tuple[str, ...]:
    """A string or a list of strings (`stop`, `stop_regex`), bounded in count and length."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"{key} must be a string or a list of strings, got {value!r}.")
    if len(value) > MAX_STOP_ITEMS or any(len(s) > MAX_STOP_CHARS for s in value):
        raise ValueError(f"{key} may hold at most {MAX_STOP_ITEMS} entries of at most {MAX_STOP_CHARS} characters.")
    return tuple(value)
