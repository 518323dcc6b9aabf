"""The emulated server's request path, in the role of SGLang's TokenizerManager.

It validates a generate request as SGLang does (inputs, sampling parameters, context length),
tokenizes it, queues it in the engine through the runner, and turns the runner's per-request state
into SGLang's output dicts `{text, output_ids, meta_info}`. The HTTP layers (native and OpenAI) only
shape these dicts into responses.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from sim.emulator.metrics import EmulatorMetrics
from sim.emulator.model_card import ModelCard, model_card
from sim.emulator.responses import dumps
from sim.emulator.runner import EngineRunner, RequestState
from sim.emulator.sampling import DEFAULT_MAX_NEW_TOKENS, parse_sampling_params
from sim.emulator.tokenizer import Tokenizer
from sim.engine import Engine, EngineConfig

WEIGHT_VERSION = "default"
QUEUE_FULL_MESSAGE = "The request queue is full."


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How to build one emulated SGLang server."""

    gpu: str = "H100"
    model: str = "llama-3.1-8b"
    time_scale: float = 1.0
    max_queued_requests: int | None = None
    max_running_requests: int | None = None
    seed: int = 0
    block_tokens: int = 16
    served_model_name: str | None = None
    enable_cache_report: bool = True
    host: str = "127.0.0.1"
    port: int = 30000


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated, tokenized generate request."""

    input_ids: list[int]
    max_new_tokens: int
    stop_at: tuple[int, str | int] | None
    no_stop_trim: bool


class Emulator:
    """Engine + tokenizer + runner + metrics of one emulated server."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.card: ModelCard = model_card(config.model)
        self.served_model_name = config.served_model_name or self.card.hf_path
        engine_config = EngineConfig(max_queued_requests=config.max_queued_requests,
                                     max_running_requests=config.max_running_requests)
        self.engine = Engine(config.gpu, self.card.name, engine_config, seed=config.seed)
        self.tokenizer = Tokenizer(self.card)
        self.metrics = EmulatorMetrics(self.served_model_name, self.scheduler_values)
        self.runner = EngineRunner(self.engine, self.metrics, config.time_scale, config.block_tokens)
        self.ready = True  # False while a server warms up: /health answers 503

    @property
    def context_len(self) -> int:
        """The longest prompt + completion a request may ask for."""
        return self.engine.cfg.context_len

    # ---- the request path -------------------------------------------------------------------

    def prepare(self, text: Any, input_ids: Any, sampling_params: Any) -> PreparedRequest:
        """Validate and tokenize a request; raises ValueError with SGLang's message when it is bad."""
        if text is None and input_ids is None:
            raise ValueError("Either text, input_ids or input_embeds should be provided.")
        if input_ids is not None:  # SGLang uses input_ids when both are given
            if isinstance(input_ids, list) and input_ids and isinstance(input_ids[0], list):
                raise ValueError("Batched requests are not supported by the emulator.")
            arr = np.asarray(input_ids) if isinstance(input_ids, list) else None
            if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise ValueError("input_ids must be a list of integers.")
            if not arr.size:
                raise ValueError("input_ids must not be empty.")
            if int(arr.min()) < 0 or int(arr.max()) >= self.card.vocab:
                raise ValueError(f"The input_ids contains values outside the vocab size ({self.card.vocab}).")
            ids = input_ids
        else:
            if isinstance(text, list):
                raise ValueError("Batched requests are not supported by the emulator.")
            if not isinstance(text, str):
                raise ValueError("text must be a string.")
            ids = self.tokenizer.encode(text)
            if not ids:
                raise ValueError("The input must contain at least one token.")
        explicit_max = isinstance(sampling_params, dict) and sampling_params.get("max_new_tokens") is not None
        params = parse_sampling_params(sampling_params, DEFAULT_MAX_NEW_TOKENS)
        n_in = len(ids)
        ctx = self.context_len
        if n_in >= ctx:
            raise ValueError(f"The input ({n_in} tokens) is longer than the model's context length ({ctx} tokens).")
        max_new = params.max_new_tokens
        if explicit_max:
            if max_new + n_in >= ctx:
                raise ValueError(
                    f"Requested token count exceeds the model's maximum context length of {ctx} tokens. "
                    f"You requested a total of {max_new + n_in} tokens: {n_in} tokens from the input messages "
                    f"and {max_new} tokens for the completion. Please reduce the number of tokens in the input "
                    f"messages or the completion to fit within the limit."
                )
        else:
            max_new = min(max_new, ctx - n_in - 1)
        stop_at = self.tokenizer.first_stop(params.stop, params.stop_token_ids, params.min_new_tokens, max_new)
        return PreparedRequest(input_ids=ids, max_new_tokens=max_new, stop_at=stop_at,
                               no_stop_trim=params.no_stop_trim)

    def submit(self, rid: str, prepared: PreparedRequest, log_metrics: bool = True,
               received_wall: float | None = None) -> RequestState:
        """Queue a prepared request (received at `received_wall`, a perf_counter value, default now);
        raises sim.engine.QueueFull when the waiting queue is full."""
        return self.runner.submit(rid, prepared.input_ids, prepared.max_new_tokens, prepared.stop_at,
                                  log_metrics=log_metrics, received_wall=received_wall)

    def reject(self, rid: str, prompt_tokens: int) -> dict[str, Any]:
        """The output dict of a request the full queue turned away (SGLang's in-band abort)."""
        self.metrics.on_abort()
        return {
            "text": "",
            "output_ids": [],
            "meta_info": {
                "id": rid,
                "finish_reason": {"type": "abort", "message": QUEUE_FULL_MESSAGE, "status_code": 503,
                                  "err_type": None},
                "prompt_tokens": prompt_tokens,
                "weight_version": WEIGHT_VERSION,
                "total_retractions": 0,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "e2e_latency": 0.0,
            },
        }

    async def updates(self, state: RequestState) -> AsyncIterator[RequestState]:
        """Yield the state each time it changed (new tokens, or finished); ends after the finish.

        Changes that happen while the consumer is busy are coalesced into one, as SGLang does."""
        while True:
            await state.changed.wait()
            state.changed.clear()
            yield state
            if state.finished:
                return

    def text(self, state: RequestState, no_stop_trim: bool = False) -> str:
        """The cumulative generated text, the matched stop string cut off at the end unless asked not to."""
        text = self.tokenizer.filler_text(state.completion_tokens)
        reason = state.finish_reason
        if reason is not None and reason.get("type") == "stop" and not no_stop_trim:
            matched = reason.get("matched")
            if isinstance(matched, str):
                pos = text.rfind(matched)
                if pos >= 0:
                    text = text[:pos]
        return text

    def output_json(self, state: RequestState, no_stop_trim: bool = False) -> bytes:
        """SGLang's output dict for the state now, as JSON: cumulative `text` and `output_ids`, and
        `meta_info`. The cumulative parts are sliced from precomputed filler strings (the filler needs
        no JSON escaping), so a chunk costs the same however long the answer has grown."""
        n = state.completion_tokens
        head = '{"text":"' + self.text(state, no_stop_trim) + '","output_ids":' + self.tokenizer.filler_ids_json(n)
        return head.encode() + b',"meta_info":' + dumps(self.meta_info(state)) + b"}"

    def meta_info(self, state: RequestState) -> dict[str, Any]:
        """SGLang's meta_info for the state now; `e2e_latency` once finished."""
        meta: dict[str, Any] = {
            "id": state.rid,
            "finish_reason": state.finish_reason,
            "prompt_tokens": state.prompt_tokens,
            "weight_version": WEIGHT_VERSION,
            "total_retractions": state.retractions,
            "completion_tokens": state.completion_tokens,
            "cached_tokens": state.cached_tokens,
        }
        if state.finished:
            meta["e2e_latency"] = state.e2e_latency()
        return meta

    # ---- load -------------------------------------------------------------------------------

    def scheduler_values(self) -> dict[str, float]:
        """The scheduler's gauges, as SGLang's SchedulerStats names them."""
        load = self.engine.load()
        return {
            "num_running_reqs": load.running,
            "num_queue_reqs": load.waiting,
            "num_used_tokens": load.used_kv_tokens,
            "token_usage": load.token_usage,
            "gen_throughput": load.gen_throughput,
            "cache_hit_rate": load.cache_hit_rate,
            "max_total_num_tokens": load.max_kv_tokens,
            "num_retracted_reqs": load.num_retracted,
            "utilization": load.token_usage,
            "num_grammar_queue_reqs": 0,
        }

