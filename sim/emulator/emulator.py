"""The emulated server's request path, in the role of SGLang's TokenizerManager.

It validates a generate request as SGLang does (inputs, sampling parameters, logprob options, context
length), tokenizes it, queues it in the engine through the runner, and turns the runner's per-request
state into SGLang's output dicts `{text, output_ids, meta_info}`. A request may hold a batch of prompts
and ask for `n` samples of each; like SGLang, the emulator then first runs every prompt once as a
prefill-only request (so that the samples share its cached prefix) and then queues the samples,
prompt-major. The HTTP layers (native and OpenAI) only shape these dicts into responses.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from sim.emulator.logprobs import MAX_TOP_LOGPROBS, Entry, LogprobTables
from sim.emulator.metrics import EmulatorMetrics
from sim.emulator.model_card import ModelCard, model_card
from sim.emulator.responses import dumps
from sim.emulator.runner import EngineRunner, RequestState
from sim.emulator.sampling import DEFAULT_MAX_NEW_TOKENS, parse_sampling_params
from sim.emulator.tokenizer import Tokenizer
from sim.engine import Engine, EngineConfig, QueueFull

WEIGHT_VERSION = "default"
QUEUE_FULL_MESSAGE = "The request queue is full."
MAX_BATCH = 1024  # prompts in one request (SGLang sets no limit)
MAX_SAMPLES = 4096  # prompts x n in one request (SGLang sets no limit)
MAX_TOKEN_IDS_LOGPROB = 128  # ids in token_ids_logprob (vLLM's limit for the same feature; SGLang sets none)


@dataclass(frozen=True, slots=True)
class EmulatorConfig:
    """How to build one emulated SGLang server."""

    gpu: str = "H100"
    model: str = "llama-3.1-8b"
    time_scale: float = 1.0
    max_queued_requests: int | None = None
    max_running_requests: int | None = None
    seed: int = 0
    block_tokens: int = 1  # SGLang's --page-size: 1 token by default
    served_model_name: str | None = None
    enable_cache_report: bool = True
    host: str = "127.0.0.1"
    port: int = 30000
    context_length: int | None = None  # default: the model's
    chunked_prefill_size: int | None = None  # default: SGLang's for the GPU's memory
    decode_log_interval: int = 40
    api_key: str | None = None
    max_payload_size: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class LogprobOptions:
    """What a request asks for in logprobs (SGLang's return_logprob, logprob_start_len, top_logprobs_num,
    token_ids_logprob, return_text_in_logprobs), validated but not yet resolved against its prompt."""

    start: int = -1  # -1: only the last prompt token (none for a prefill-only request)
    top_n: int = 0
    token_ids: tuple[int, ...] | None = None
    text: bool = False

    @classmethod
    def parse(cls, return_logprob: Any, logprob_start_len: Any = -1, top_logprobs_num: Any = 0,
              token_ids_logprob: Any = None, return_text_in_logprobs: Any = False,
              vocab: int | None = None) -> LogprobOptions | None:
        """None unless `return_logprob`; ValueError for a malformed option."""
        if not return_logprob:
            return None
        start = -1 if logprob_start_len is None else logprob_start_len
        if isinstance(start, bool) or not isinstance(start, int) or start < -1:
            raise ValueError(f"logprob_start_len must be an integer >= -1, got {logprob_start_len!r}.")
        top_n = top_logprobs_num or 0
        if isinstance(top_n, bool) or not isinstance(top_n, int) or not 0 <= top_n <= MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs_num must be an integer in [0, {MAX_TOP_LOGPROBS}], "
                             f"got {top_logprobs_num!r}.")
        ids = token_ids_logprob
        if ids is not None:
            if (not isinstance(ids, list) or len(ids) > MAX_TOKEN_IDS_LOGPROB
                    or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids)):
                raise ValueError(f"token_ids_logprob must be a list of at most {MAX_TOKEN_IDS_LOGPROB} integers.")
            if vocab is not None and any(not 0 <= t < vocab for t in ids):
                raise ValueError(f"token_ids_logprob contains values outside the vocab size ({vocab}).")
            ids = tuple(ids)
        return cls(start=start, top_n=top_n, token_ids=ids, text=bool(return_text_in_logprobs))


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """A validated, tokenized generate request for one prompt (and `n` samples of it)."""

    input_ids: list[int]
    max_new_tokens: int  # 0: prefill only
    stop_at: tuple[int, str | int] | None  # (tokens, matched string, pattern or token id)
    trim: str | None  # the matched stop string, cut from the end of the text (None: nothing to cut)
    n: int = 1
    logprobs: LogprobOptions | None = None  # resolved: `start` is the first prompt position reported
    input_texts: list[str] | None = None  # per prompt token, when logprobs return text and the prompt was text
    cache_salt: str | None = None


@dataclass(slots=True)
class Sample:
    """One generation of one prompt: its request, its state in the runner, and its place in the answer."""

    index: int
    prepared: PreparedRequest
    state: RequestState
    sent_tokens: int = 0  # output tokens a streaming handler has passed on
    sent_chars: int = 0  # characters of text likewise
    input_logprobs: tuple[Any, Any, Any] | None = field(default=None, repr=False)  # cached entries


class Generation:
    """The samples of one HTTP request, followed together."""

    def __init__(self, runner: EngineRunner, samples: list[Sample]) -> None:
        self.runner = runner
        self.samples = samples
        self.changed = asyncio.Event()
        for s in samples:
            s.state.group = self.changed
            if s.state.changed.is_set() or s.state.finished:
                self.changed.set()

    @property
    def finished(self) -> bool:
        return all(s.state.finished for s in self.samples)

    async def wait(self) -> None:
        """Return once every sample has finished (or was aborted)."""
        while not self.finished:
            await self.changed.wait()
            self.changed.clear()

    async def updates(self) -> AsyncIterator[Sample]:
        """Yield a sample each time it changed (changes coalesced, as SGLang does); ends when all finished."""
        pending = list(self.samples)
        while pending:
            await self.changed.wait()
            self.changed.clear()
            still: list[Sample] = []
            for s in pending:
                if s.state.changed.is_set():
                    s.state.changed.clear()
                    yield s
                if not s.state.finished:
                    still.append(s)
            pending = still

    def abort(self, message: str) -> None:
        """Abort every sample still running."""
        for s in self.samples:
            if not s.state.finished:
                self.runner.abort(s.state.rid, message)


class Emulator:
    """Engine + tokenizer + runner + metrics of one emulated server."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self.card: ModelCard = model_card(config.model)
        self.served_model_name = config.served_model_name or self.card.hf_path
        engine_config = EngineConfig(max_queued_requests=config.max_queued_requests,
                                     max_running_requests=config.max_running_requests,
                                     context_len=config.context_length,
                                     chunked_prefill_size=config.chunked_prefill_size,
                                     decode_log_interval=config.decode_log_interval)
        self.engine = Engine(config.gpu, self.card.name, engine_config, seed=config.seed)
        self.tokenizer = Tokenizer(self.card)
        self.logprobs = LogprobTables(self.tokenizer, config.seed)
        self.metrics = EmulatorMetrics(self.served_model_name, self.scheduler_values)
        self.runner = EngineRunner(self.engine, self.metrics, config.time_scale, config.block_tokens)
        self.ready = True  # False while a server warms up: /health answers 503

    @property
    def context_len(self) -> int:
        """The longest prompt + completion a request may ask for."""
        return self.engine.cfg.context_len

    # ---- the request path -------------------------------------------------------------------

    def prepare(self, text: Any, input_ids: Any, sampling_params: Any, logprobs: LogprobOptions | None = None,
                cache_salt: str | None = None) -> PreparedRequest:
        """Validate and tokenize one prompt's request; raises ValueError with SGLang's message when it is bad."""
        if text is None and input_ids is None:
            raise ValueError("Either text, input_ids or input_embeds should be provided.")
        texts: list[str] | None = None
        if input_ids is not None:  # SGLang uses input_ids when both are given
            arr = np.asarray(input_ids) if isinstance(input_ids, list) else None
            if arr is None or arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
                raise ValueError("input_ids must be a list of integers.")
            if not arr.size:
                raise ValueError("input_ids must not be empty.")
            if int(arr.min()) < 0 or int(arr.max()) >= self.card.vocab:
                raise ValueError(f"The input_ids contains values outside the vocab size ({self.card.vocab}).")
            ids = input_ids
        else:
            if not isinstance(text, str):
                raise ValueError("text must be a string.")
            ids = self.tokenizer.encode(text)
            if not ids:
                raise ValueError("The input must contain at least one token.")
            if logprobs is not None and logprobs.text:
                texts = self.tokenizer.pieces(text)
                if self.card.bos_token_id is not None:
                    texts.insert(0, self.tokenizer.token_text(self.card.bos_token_id))
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise ValueError("cache_salt must be a string.")
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
        if logprobs is not None:
            start = logprobs.start
            if start == -1:
                start = n_in if max_new == 0 else n_in - 1
            elif start >= n_in:
                raise ValueError(f"logprob_start_len ({start}) must be smaller than the number of input tokens "
                                 f"({n_in}).")
            logprobs = replace(logprobs, start=start)
        stop_at = self.tokenizer.first_stop(params.stop, params.stop_token_ids, params.min_new_tokens, max_new,
                                            params.stop_regex)
        trim = None
        if stop_at is not None and not params.no_stop_trim and stop_at[1] in params.stop:
            trim = str(stop_at[1])
        return PreparedRequest(input_ids=ids, max_new_tokens=max_new, stop_at=stop_at, trim=trim, n=params.n,
                               logprobs=logprobs, input_texts=texts, cache_salt=cache_salt or None)

    def submit(self, rid: str, prepared: PreparedRequest, log_metrics: bool = True,
               received_wall: float | None = None) -> RequestState:
        """Queue one generation of a prepared request (received at `received_wall`, a perf_counter value,
        default now); raises sim.engine.QueueFull when the waiting queue is full."""
        return self.runner.submit(rid, prepared.input_ids, prepared.max_new_tokens, prepared.stop_at,
                                  log_metrics=log_metrics, received_wall=received_wall,
                                  cache_salt=prepared.cache_salt)

    async def generate(self, prepared: Sequence[PreparedRequest], rids: Sequence[str] | None = None,
                       log_metrics: bool = True, received_wall: float | None = None) -> Generation:
        """Queue `n` samples of each prepared prompt, prompt-major, as one Generation.

        With n > 1 every prompt first runs as a prefill-only request, awaited, as SGLang does to share
        the prompt's KV between the samples. `rids` name the samples (default: fresh ids). Raises
        QueueFull (after aborting what it had queued) or ValueError (`n` differs between prompts, or
        too many samples)."""
        n = prepared[0].n
        if any(p.n != n for p in prepared):
            raise ValueError("All prompts of a batch must ask for the same n.")
        total = len(prepared) * n
        if len(prepared) > MAX_BATCH or total > MAX_SAMPLES:
            raise ValueError(f"A request may hold at most {MAX_BATCH} prompts and {MAX_SAMPLES} samples, "
                             f"got {len(prepared)} prompts x n={n}.")
        if rids is not None and len(rids) != total:
            raise ValueError(f"The number of rids ({len(rids)}) does not match the number of samples ({total}).")
        names = list(rids) if rids is not None else [uuid.uuid4().hex for _ in range(total)]
        if n > 1:
            warm = [replace(p, max_new_tokens=0, stop_at=None, trim=None, logprobs=None) for p in prepared]
            warming = self._submit_all([uuid.uuid4().hex for _ in warm], warm, log_metrics, received_wall)
            await Generation(self.runner, warming).wait()
            received_wall = None  # the samples arrive now
        jobs = [p for p in prepared for _ in range(n)]
        return Generation(self.runner, self._submit_all(names, jobs, log_metrics, received_wall))

    def _submit_all(self, rids: Sequence[str], jobs: Sequence[PreparedRequest], log_metrics: bool,
                    received_wall: float | None) -> list[Sample]:
        samples: list[Sample] = []
        try:
            for i, (rid, job) in enumerate(zip(rids, jobs, strict=True)):
                samples.append(Sample(i, job, self.submit(rid, job, log_metrics, received_wall)))
        except (QueueFull, ValueError) as exc:
            message = (QUEUE_FULL_MESSAGE if isinstance(exc, QueueFull)
                       else "Another sample of the request was rejected.")
            for s in samples:
                self.runner.abort(s.state.rid, message)
            raise
        return samples

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

    # ---- outputs ----------------------------------------------------------------------------

    def text(self, state: RequestState, trim: str | None = None) -> str:
        """The cumulative generated text; once stopped by the stop string `trim`, with it cut off the end."""
        text = self.tokenizer.filler_text(state.completion_tokens)
        reason = state.finish_reason
        if trim is not None and reason is not None and reason.get("type") == "stop":
            pos = text.rfind(trim)
            if pos >= 0:
                text = text[:pos]
        return text

    def output(self, sample: Sample, index: bool = False) -> dict[str, Any]:
        """SGLang's output dict for a sample now (with its `index` in the request when asked)."""
        state = sample.state
        out: dict[str, Any] = {
            "text": self.text(state, sample.prepared.trim),
            "output_ids": self.tokenizer.filler_ids(state.completion_tokens),
            "meta_info": self.meta_info(sample),
        }
        if index:
            out["index"] = sample.index
        return out

    def output_json(self, sample: Sample, index: bool = False) -> bytes:
        """`output` as JSON. Without logprobs the cumulative parts are sliced from precomputed filler
        strings (the filler needs no JSON escaping), so a chunk costs the same however long the answer
        has grown."""
        if sample.prepared.logprobs is not None:
            return dumps(self.output(sample, index))
        state = sample.state
        n = state.completion_tokens
        head = ('{"text":"' + self.text(state, sample.prepared.trim) + '","output_ids":'
                + self.tokenizer.filler_ids_json(n))
        tail = b',"index":%d}' % sample.index if index else b"}"
        return head.encode() + b',"meta_info":' + dumps(self.meta_info(sample)) + tail

    def meta_info(self, sample: Sample) -> dict[str, Any]:
        """SGLang's meta_info for a sample now; `e2e_latency` once finished, logprobs when asked for."""
        state = sample.state
        meta: dict[str, Any] = {
            "id": state.rid,
            "finish_reason": state.finish_reason,
            "prompt_tokens": state.prompt_tokens,
            "weight_version": WEIGHT_VERSION,
        }
        opts = sample.prepared.logprobs
        if opts is not None:
            in_tokens, in_top, in_ids = self.input_logprobs(sample)
            out_tokens, out_top, out_ids = self.output_logprobs(sample, 0, state.completion_tokens)
            meta["input_token_logprobs"] = in_tokens
            meta["output_token_logprobs"] = out_tokens
            if opts.top_n:
                meta["input_top_logprobs"] = in_top
                meta["output_top_logprobs"] = out_top
            if opts.token_ids is not None:
                meta["input_token_ids_logprobs"] = in_ids
                meta["output_token_ids_logprobs"] = out_ids
        meta["total_retractions"] = state.retractions
        meta["completion_tokens"] = state.completion_tokens
        meta["cached_tokens"] = state.cached_tokens
        if state.finished:
            meta["e2e_latency"] = state.e2e_latency()
        return meta

    def input_logprobs(self, sample: Sample) -> tuple[list[Entry], Any, Any]:
        """(token, top, requested-ids) logprob entries of the prompt positions the request asked for."""
        if sample.input_logprobs is None:
            p = sample.prepared
            opts = p.logprobs or LogprobOptions(start=len(p.input_ids))
            sample.input_logprobs = self.logprobs.input(p.input_ids, p.input_texts, opts.start, opts.top_n,
                                                        opts.token_ids, opts.text)
        return sample.input_logprobs

    def output_logprobs(self, sample: Sample, lo: int, hi: int) -> tuple[list[Entry], Any, Any]:
        """(token, top, requested-ids) logprob entries of generated tokens lo..hi-1."""
        p = sample.prepared
        opts = p.logprobs or LogprobOptions()
        return self.logprobs.output(p.input_ids[-1], lo, hi, opts.top_n, opts.token_ids, opts.text)

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
            "spec_accept_length": 0.0,  # no speculative decoding: SGLang reports 0
        }

