"""One SGLang engine instance: waiting queue, continuous batching, chunked prefill, radix cache, retraction.

The scheduling follows SGLang 0.5.x (`managers/scheduler.py`, `schedule_policy.py`, `schedule_batch.py`):

* Each iteration first tries to form a prefill batch (`get_new_batch_prefill`): the unfinished chunked
  request first, then waiting requests in policy order (FCFS, or longest prefix match with "lpm"),
  admitted by a PrefillAdder budget: `max_prefill_tokens` input tokens, `chunked_prefill_size` tokens
  per batch (the request that overflows it is truncated and becomes the chunked request),
  `max_running_requests`, and KV tokens: free + evictable minus, for every running request,
  min(remaining max_new_tokens, 4096) * new_token_ratio. A request that does not fit ends the
  batch and marks the running batch full until a request leaves it. Prefill is run without the
  decoding requests unless `enable_mixed_chunk`.
* Otherwise the running requests decode one token each. If the KV pool cannot take one more token per
  request, requests are retracted (fewest output tokens first, then longest prompt) until there is
  room for `retract_decode_steps` tokens each; their KV is freed (the cached prompt prefix stays in
  the radix cache, unreferenced) and they return to the back of the waiting queue, to be prefilled
  again with their output so far. new_token_ratio decays each decode step and is re-estimated after
  a retraction.

There is no clock inside: `step(now)` computes one iteration starting at `now` and applies its effects
at once; the caller treats them as happening at `now + duration_s`. Given the same calls and seed the
engine is deterministic (randomness is used only for the optional step-time jitter).

Cost: a decode iteration is O(1) in the number of running requests apart from building the token
dict (in C): running requests advance by a shared decode counter and are materialized only when they
leave the batch, and finishes come off a heap keyed by the counter value at which each one ends.
"""

from __future__ import annotations

import copy
import heapq
import math
import random
from dataclasses import dataclass, field

from lodestar import hardware
from sim.engine.config import EngineConfig, kv_token_budget, max_running_requests
from sim.engine.perf_model import PerfModel
from sim.engine.radix_cache import ROOT, BlockRadixCache

LPM_FALLBACK_QUEUE_LEN = 128  # SGLang switches lpm to fcfs above this many waiting requests


class QueueFull(Exception):
    """The waiting queue holds max_queued_requests requests (SGLang answers 503)."""


class RequestTooLarge(ValueError):
    """The request can never fit in this engine's KV cache (SGLang answers 400)."""


@dataclass(slots=True)
class EngineRequest:
    """A request as the engine sees it: token counts and the chained hashes of its prompt's whole blocks."""

    rid: str
    prompt_len: int
    block_hashes: tuple[int, ...]
    block_tokens: int
    max_new_tokens: int  # 0: prefill only (SGLang's scoring and prefix-warming requests)
    arrival_s: float
    stop_after: int | None = None  # output length at which an EOS stops it ("stop"); None: runs to the limit
    # Chained hashes of the whole blocks of prompt + output that follow the prompt's whole blocks (the
    # chain continues block_hashes), when the caller knows the output (multi-turn replays): on finishing,
    # the blocks the output completed are cached, as SGLang caches a finished request's answer.
    output_block_hashes: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class FirstToken:
    """A request's first output token, emitted by the iteration that finished its prefill."""

    rid: str
    cached_tokens: int
    prompt_len: int
    queued_s: float = 0.0  # from arrival to the start of its first prefill iteration


@dataclass(slots=True, frozen=True)
class Finished:
    """A request leaving the engine."""

    rid: str
    reason: str  # "length" | "stop" | "abort"
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


@dataclass(slots=True)
class StepOutcome:
    """What one call to `Engine.step` did; its effects happen at `now + duration_s`."""

    duration_s: float
    iterations: int
    first_tokens: list[FirstToken] = field(default_factory=list)
    tokens: dict[str, int] = field(default_factory=dict)  # rid -> new output tokens (first token included)
    finished: list[Finished] = field(default_factory=list)
    retracted: list[str] = field(default_factory=list)
    kind: str = "idle"  # "prefill" | "mixed" | "decode" | "idle"
    prefill_tokens: int = 0  # new tokens prefilled (all iterations)
    batch_size: int = 0  # requests in the (last) iteration's batch


@dataclass(slots=True, frozen=True)
class EngineLoad:
    """Live state, as SGLang's /get_load and /metrics report it."""

    running: int  # decoding requests, plus the request being chunk-prefilled
    waiting: int
    used_kv_tokens: int  # KV held by requests (not counting evictable cache)
    max_kv_tokens: int
    token_usage: float
    pending_prefill_tokens: int  # prompt tokens not yet prefilled (waiting + chunked)
    cache_hit_rate: float  # of the last prefill batch, as SGLang logs it
    num_retracted: int  # since start
    gen_throughput: float  # tokens/s over the last decode_log_interval decode iterations
    evictable_kv_tokens: int = 0
    new_token_ratio: float = 0.0


class _Req:
    """Scheduler state of one request."""

    __slots__ = ("req", "rid", "prompt_len", "hashes", "bt", "max_new", "limit", "stop_reason", "output",
                 "kv_len", "node", "locked_blocks", "cached_tokens", "queued_s", "clock0", "epoch")

    def __init__(self, req: EngineRequest) -> None:
        self.req = req
        self.rid = req.rid
        self.prompt_len = req.prompt_len
        self.bt = req.block_tokens
        self.hashes = tuple(req.block_hashes[: req.prompt_len // req.block_tokens])
        if req.output_block_hashes and len(self.hashes) == req.prompt_len // req.block_tokens:
            self.hashes += tuple(req.output_block_hashes)
        self.max_new = req.max_new_tokens
        stops_early = req.stop_after is not None and req.stop_after < req.max_new_tokens
        self.limit = max(1, req.stop_after) if stops_early else req.max_new_tokens  # type: ignore[arg-type]
        self.stop_reason = "stop" if stops_early else "length"
        self.output = 0
        self.kv_len = 0
        self.node = ROOT
        self.locked_blocks = 0
        self.cached_tokens = -1  # set at the first prefill admission
        self.queued_s = 0.0
        self.clock0 = 0  # while running: output and kv_len are as of this value of the decode counter
        self.epoch = 0  # bumped on joining or leaving the running batch (invalidates finish-heap entries)

    @property
    def fill_len(self) -> int:
        """Tokens whose KV must exist before the next token can be generated."""
        return self.prompt_len + self.output

    @property
    def private(self) -> int:
        """KV tokens held outside the radix cache (partial block, output, duplicate of a cached tail)."""
        p = self.kv_len - self.locked_blocks * self.bt
        return p if p > 0 else 0


class Engine:
    """An SGLang engine on one GPU: call add/abort as requests come and step() to run iterations."""

    def __init__(self, gpu: str, model: str = "llama-3.1-8b", config: EngineConfig | None = None,
                 seed: int = 0, slowdown: float = 1.0) -> None:
        g = hardware.gpu(gpu)
        m = hardware.model(model)
        self.gpu_type = g.name
        self.model_name = m.name
        self.cfg = (config or EngineConfig()).resolved(g, m)
        self.perf = PerfModel(g.name, m.name)
        self.max_kv_tokens = kv_token_budget(g, m, self.cfg.mem_fraction_static)  # type: ignore[arg-type]
        self.max_running_requests = max_running_requests(self.cfg, self.max_kv_tokens)
        chunk = self.cfg.chunked_prefill_size or 0
        self.chunk_size: int | None = chunk if chunk > 0 else None
        self.init_new_token_ratio = min(self.cfg.init_new_token_ratio * self.cfg.schedule_conservativeness, 1.0)
        self.min_new_token_ratio = min(self.init_new_token_ratio * self.cfg.min_new_token_ratio_factor, 1.0)
        self.new_token_ratio_decay = ((self.init_new_token_ratio - self.min_new_token_ratio)
                                      / self.cfg.new_token_ratio_decay_steps)
        self.new_token_ratio = self.init_new_token_ratio
        self.slowdown = slowdown
        self.seed = seed
        self._rng = random.Random(seed)
        self.cache = BlockRadixCache()
        self.waiting: list[_Req] = []
        self.running: dict[str, _Req] = {}  # decoding requests, by rid, in join order
        self._clock = 0  # decode iterations applied to the running batch
        self._finish_heap: list[tuple[int, int, _Req, int]] = []  # (clock at finish, seq, request, epoch)
        self._heap_seq = 0
        self._rem_base = 0  # sum over running (not in _big) of max_new - output + clock0
        self._big: dict[str, _Req] = {}  # running requests whose remaining max_new exceeded the clip
        self.chunked: _Req | None = None
        self.batch_is_full = False
        self._shrunk = False  # requests left the running batch since the last decode step
        self._private = 0  # KV tokens of requests outside the cache
        self._running_ctx = 0  # sum of kv_len over running
        self._pending_prefill = 0
        self._pending_aborts: list[Finished] = []
        self._batch_hit = 0  # cached tokens of the requests admitted into the batch being formed
        self.num_retracted = 0
        self.cache_hit_rate = 0.0
        self.gen_throughput = 0.0
        self._log_tokens = 0
        self._log_time = 0.0
        self._log_iters = 0

    # ---- requests ------------------------------------------------------------------------------
    def add(self, req: EngineRequest, now: float) -> None:
        """Queue a request (arrived at `now`). Raises QueueFull or RequestTooLarge as SGLang would reject it."""
        if self.cfg.max_queued_requests is not None and len(self.waiting) >= self.cfg.max_queued_requests:
            raise QueueFull("The request queue is full.")
        if req.prompt_len < 1 or req.max_new_tokens < 0 or req.block_tokens < 1:
            raise ValueError("prompt_len and block_tokens must be >= 1, max_new_tokens >= 0")
        need = req.prompt_len + min(req.max_new_tokens, self.cfg.clip_max_new_tokens)
        if need >= self.max_kv_tokens or req.prompt_len + req.max_new_tokens > (self.cfg.context_len or need):
            raise RequestTooLarge(
                f"request needs {need} KV tokens (prompt {req.prompt_len}); this engine holds "
                f"{self.max_kv_tokens} and a context of {self.cfg.context_len}")
        r = _Req(req)
        self.waiting.append(r)
        self._pending_prefill += r.prompt_len

    def abort(self, rid: str) -> bool:
        """Remove a request wherever it is; its Finished(reason="abort") comes with the next step."""
        r = next((x for x in self.waiting if x.rid == rid), None)
        if r is not None:
            self.waiting.remove(r)
            self._pending_prefill -= r.fill_len - r.kv_len
        elif self.chunked is not None and self.chunked.rid == rid:
            r = self.chunked
            self.chunked = None
            self._pending_prefill -= r.fill_len - r.kv_len
            self._release(r)
        else:
            r = self.running.get(rid)
            if r is None:
                return False
            self._leave_running(r)
            self._release(r)
            self._shrunk = True
        self._pending_aborts.append(Finished(rid, "abort", r.prompt_len, r.output, max(r.cached_tokens, 0)))
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked is not None or self._pending_aborts)

    # ---- iterations ----------------------------------------------------------------------------
    def step(self, now: float, until: float | None = None) -> StepOutcome:
        """Run one iteration starting at `now` (or, for pure decode with `until` given, as many fused
        decode iterations as end by `until` and before any request finishes; at least one)."""
        out = StepOutcome(0.0, 0)
        if self._pending_aborts:
            out.finished.extend(self._pending_aborts)
            self._pending_aborts = []
        batch = self._form_prefill(now)
        if batch is not None:
            self._run_prefill(batch, out)
        elif self.running:
            self._run_decode(now, until, out)
        else:  # idle: SGLang re-initializes the ratio, and an emptied batch is not full
            self.new_token_ratio = self.init_new_token_ratio
            self.batch_is_full = False
            self._shrunk = False
        return out

    def _available(self) -> int:
        return self.max_kv_tokens - self.cache.total_tokens - self._private

    def _form_prefill(self, now: float) -> list[tuple[_Req, int, int]] | None:
        """SGLang's get_new_batch_prefill + PrefillAdder: [(request, new tokens, prefix tokens)]."""
        if self.chunked is None and (not self.waiting or self.batch_is_full):
            return None
        cfg = self.cfg
        running = self.running
        running_bs = len(running)
        allocatable = self.max_running_requests - running_bs
        if allocatable <= 0 and self.chunked is None:
            self.batch_is_full = True
            return None
        cache = self.cache
        clip = cfg.clip_max_new_tokens
        mixed = running_bs if cfg.enable_mixed_chunk and running else 0
        offset_total = mixed + self.new_token_ratio * self._remaining_new_tokens()
        offset_cur = mixed
        rem_input = cfg.max_prefill_tokens - mixed
        rem_chunk = self.chunk_size - mixed if self.chunk_size is not None else None
        base = self.max_kv_tokens - cache.total_tokens - self._private  # available

        batch: list[tuple[_Req, int, int]] = []
        new_chunked: _Req | None = None
        self._batch_hit = 0
        r = self.chunked
        if r is not None:
            remaining = r.fill_len - r.kv_len
            ext = remaining if rem_chunk is None else min(remaining, rem_chunk)
            batch.append((r, ext, r.kv_len))
            truncated = ext < remaining
            est = 0 if truncated else min(r.max_new - r.output, clip)
            offset_total += ext + est
            offset_cur += ext
            rem_input -= ext
            if rem_chunk is not None:
                rem_chunk -= ext
            new_chunked = r if truncated else None
        admitted = 0
        if self.waiting and (rem_chunk is None or rem_chunk > 0) and rem_input > 0:
            if cfg.schedule_policy == "lpm" and len(self.waiting) <= LPM_FALLBACK_QUEUE_LEN:
                self.waiting.sort(key=lambda x: -cache.cached_blocks(x.hashes, x.fill_len // x.bt))
            idle = not running and self.chunked is None
            for r in self.waiting:
                if len(batch) >= allocatable:
                    self.batch_is_full = True
                    break
                if cfg.disable_radix_cache:
                    k, node = 0, ROOT
                else:
                    k, node = cache.match_prefix(r.hashes, r.fill_len // r.bt)
                fill = r.fill_len
                prefix = min(k * r.bt, fill - 1)
                ext = fill - prefix
                total = ext + min(r.max_new - r.output, clip)
                avail_evict = base + cache.evictable_tokens
                if total >= avail_evict - offset_total and not (idle and not batch and ext <= avail_evict):
                    self.batch_is_full = True
                    break
                if batch and ext >= rem_input:
                    break
                cache.lock(node)
                avail_evict = base + cache.evictable_tokens
                if total >= avail_evict - offset_total and not (idle and not batch and ext <= avail_evict):
                    cache.unlock(node)
                    self.batch_is_full = True
                    break
                if rem_chunk is not None and ext > rem_chunk:
                    ext = rem_chunk
                    est = 0
                    new_chunked = r
                else:
                    est = min(r.max_new - r.output, clip)
                r.node = node
                r.locked_blocks = k
                r.kv_len = prefix
                if r.cached_tokens < 0:
                    r.cached_tokens = prefix
                    r.queued_s = max(0.0, now - r.req.arrival_s)
                self._pending_prefill -= prefix
                self._batch_hit += prefix
                batch.append((r, ext, prefix))
                admitted += 1
                offset_total += ext + est
                offset_cur += ext
                rem_input -= ext
                if rem_chunk is not None:
                    rem_chunk -= ext
                if new_chunked is r:
                    break
                avail_evict = base + cache.evictable_tokens
                if avail_evict - offset_total <= 0 or avail_evict - offset_cur <= 0:
                    self.batch_is_full = True
                    break
                if rem_input <= 0 or (rem_chunk is not None and rem_chunk <= 0):
                    break
        if admitted:
            del self.waiting[:admitted]
        if not batch:
            return None
        self.chunked = new_chunked
        return batch

    def _run_prefill(self, batch: list[tuple[_Req, int, int]], out: StepOutcome) -> None:
        cache = self.cache
        running = self.running
        mix = bool(self.cfg.enable_mixed_chunk and running)
        if mix and self._available() + cache.evictable_tokens < len(running) + sum(e for _, e, _ in batch):
            mix = False
        need = sum(e for _, e, _ in batch) + (len(running) if mix else 0)
        self._make_room(need)
        chunks = [(ext, prefix) for _, ext, prefix in batch]
        n_dec = len(running) if mix else 0
        duration = self.perf.step_time(chunks, n_dec, self._running_ctx if mix else 0)
        out.duration_s = self._scaled(duration)
        out.iterations = 1
        out.kind = "mixed" if mix else "prefill"
        out.batch_size = len(batch) + n_dec
        hit = self._batch_hit
        new_tokens = 0
        joined: list[_Req] = []
        for r, ext, _ in batch:
            new_tokens += ext
            self._pending_prefill -= ext
            self._set_kv(r, r.kv_len + ext)
            self._cache_blocks(r)
            if r.kv_len < r.fill_len:
                continue  # the chunked request: more chunks to go
            if r.limit == 0:  # prefill only (max_new_tokens 0): done once the prompt is in the cache
                self._finish(r, out)
                continue
            if r.output == 0:
                out.first_tokens.append(FirstToken(r.rid, r.cached_tokens, r.prompt_len, r.queued_s))
            r.output += 1
            out.tokens[r.rid] = out.tokens.get(r.rid, 0) + 1
            if r.output >= r.limit:
                self._finish(r, out)  # never joined the running batch: it does not shrink
            else:
                joined.append(r)
        out.prefill_tokens = new_tokens
        self.cache_hit_rate = hit / (hit + new_tokens) if hit + new_tokens else 0.0
        if mix:
            self._advance_decode(1, out)
            self.new_token_ratio = max(self.new_token_ratio - self.new_token_ratio_decay, self.min_new_token_ratio)
        for r in joined:
            self._join_running(r)

    def _run_decode(self, now: float, until: float | None, out: StepOutcome) -> None:
        cache = self.cache
        if self._shrunk:  # SGLang's update_running_batch: a batch that lost requests is no longer full
            self.batch_is_full = False
            self._shrunk = False
        n = len(self.running)
        if self._available() + cache.evictable_tokens < n:
            self._retract(out)
            if self._available() + cache.evictable_tokens < len(self.running):
                # a lone request longer than the whole KV pool: SGLang aborts it
                for r in list(self.running.values()):
                    self._leave_running(r)
                    self._finish(r, out, "abort")
                return
            n = len(self.running)
            total_out = sum(r.output for r in self.running.values())  # materialized by _retract
            total_max = sum(r.max_new for r in self.running.values())
            self.new_token_ratio = min(1.0, (total_out + self.cfg.retract_decode_steps * n) / max(total_max, 1))
            k = 1
        else:
            k = 1
            can_fuse = self.chunked is None and (not self.waiting or self.batch_is_full)
            if until is not None and can_fuse and until > now:
                k_finish = self._next_finish_clock() - self._clock
                k_mem = (self._available() + cache.evictable_tokens) // n
                if k_finish > 1 and k_mem > 1:
                    budget = (until - now) / self.slowdown
                    k_time = self.perf.decode_iterations_within(n, self._running_ctx, budget)
                    k = max(1, min(k_finish, k_mem, k_time))
            self.new_token_ratio = max(self.new_token_ratio - k * self.new_token_ratio_decay, self.min_new_token_ratio)
        self._make_room(n * k)
        duration = self.perf.decode_run_time(n, self._running_ctx, k)
        out.duration_s = self._scaled(duration)
        out.iterations = k
        out.kind = "decode"
        out.batch_size = n
        self._log_tokens += n * k
        self._log_time += out.duration_s
        self._log_iters += k
        if self._log_iters >= self.cfg.decode_log_interval:
            self.gen_throughput = self._log_tokens / self._log_time if self._log_time > 0 else 0.0
            self._log_tokens = 0
            self._log_time = 0.0
            self._log_iters = 0
        self._advance_decode(k, out)

    def _advance_decode(self, k: int, out: StepOutcome) -> None:
        """Every running request writes k tokens' KV and emits k tokens; some may finish."""
        n = len(self.running)
        self._clock += k
        if out.tokens:
            out.tokens.update(dict.fromkeys(self.running, k))
        else:
            out.tokens = dict.fromkeys(self.running, k)
        self._private += n * k
        self._running_ctx += n * k
        heap = self._finish_heap
        while heap and heap[0][0] <= self._clock:
            _, _, r, epoch = heapq.heappop(heap)
            if epoch == r.epoch:
                self._leave_running(r)
                self._finish(r, out)
                self._shrunk = True

    def _join_running(self, r: _Req) -> None:
        clock = self._clock
        r.clock0 = clock
        r.epoch += 1
        self.running[r.rid] = r
        self._running_ctx += r.kv_len
        heapq.heappush(self._finish_heap, (clock + r.limit - r.output, self._heap_seq, r, r.epoch))
        self._heap_seq += 1
        if r.max_new - r.output > self.cfg.clip_max_new_tokens:
            self._big[r.rid] = r
        else:
            self._rem_base += r.max_new - r.output + clock

    def _materialize(self, r: _Req) -> None:
        """Bring a running request's output and kv_len up to the decode counter."""
        d = self._clock - r.clock0
        if d:
            r.output += d
            r.kv_len += d
            r.clock0 = self._clock

    def _leave_running(self, r: _Req) -> None:
        self._materialize(r)
        del self.running[r.rid]
        self._running_ctx -= r.kv_len
        if self._big.pop(r.rid, None) is None:
            self._rem_base -= r.max_new - r.output + self._clock
        r.epoch += 1

    def _next_finish_clock(self) -> int:
        heap = self._finish_heap
        while heap[0][3] != heap[0][2].epoch:
            heapq.heappop(heap)
        return heap[0][0]

    def _remaining_new_tokens(self) -> int:
        """Sum over running requests of min(max_new_tokens - output, clip), as PrefillAdder reserves."""
        clip = self.cfg.clip_max_new_tokens
        clock = self._clock
        total = self._rem_base - (len(self.running) - len(self._big)) * clock
        for r in self._big.values():
            total += min(r.max_new - r.output - (clock - r.clock0), clip)
        return total

    def _retract(self, out: StepOutcome) -> None:
        """Free KV by sending requests back to the waiting queue (SGLang's retract_decode)."""
        for r in self.running.values():
            self._materialize(r)
        order = sorted(self.running.values(), key=lambda r: (r.output, -r.prompt_len), reverse=True)
        need_each = self.cfg.retract_decode_steps
        first = True
        while first or self._available() + self.cache.evictable_tokens < need_each * len(order):
            if len(order) == 1:
                break
            first = False
            r = order.pop()
            self._leave_running(r)
            self._release(r)
            r.kv_len = 0
            self._pending_prefill += r.fill_len
            self.waiting.append(r)
            out.retracted.append(r.rid)
            self.num_retracted += 1
        self.batch_is_full = False

    # ---- KV bookkeeping ------------------------------------------------------------------------
    def _set_kv(self, r: _Req, kv_len: int) -> None:
        before = r.private
        r.kv_len = kv_len
        self._private += r.private - before

    def _cache_blocks(self, r: _Req) -> None:
        """Move the request's computed whole blocks whose hashes are known into the radix cache, referenced."""
        if self.cfg.disable_radix_cache:
            return
        nb = min(len(r.hashes), r.kv_len // r.bt)
        if nb > r.locked_blocks:
            old_private = r.private
            node = self.cache.insert(r.hashes[:nb], r.bt)
            self.cache.lock(node)
            self.cache.unlock(r.node)
            r.node = node
            r.locked_blocks = nb
            self._private += r.private - old_private

    def _release(self, r: _Req) -> None:
        """Drop a request's KV: private tokens freed, its cached prefix unreferenced."""
        self._private -= r.private
        self.cache.unlock(r.node)
        r.node = ROOT
        r.locked_blocks = 0

    def _finish(self, r: _Req, out: StepOutcome, reason: str | None = None) -> None:
        if reason is None:
            self._cache_blocks(r)  # the answer's completed blocks, when their hashes are known
        self._release(r)
        out.finished.append(Finished(r.rid, reason or r.stop_reason, r.prompt_len, r.output,
                                     max(r.cached_tokens, 0)))

    def _make_room(self, tokens: int) -> None:
        short = tokens - self._available()
        if short > 0:
            self.cache.evict(short)
            if self._available() < tokens:
                raise RuntimeError(f"KV budget exceeded: need {tokens}, have {self._available()}")

    def _scaled(self, seconds: float) -> float:
        sigma = self.cfg.step_time_jitter
        if sigma > 0:
            seconds *= math.exp(self._rng.gauss(0.0, sigma) - sigma * sigma / 2)
        return seconds * self.slowdown

    # ---- state ---------------------------------------------------------------------------------
    def load(self) -> EngineLoad:
        """Live load figures."""
        evictable = self.cache.evictable_tokens
        used = self.max_kv_tokens - self._available() - evictable
        return EngineLoad(
            running=len(self.running) + (1 if self.chunked is not None else 0),
            waiting=len(self.waiting),
            used_kv_tokens=used,
            max_kv_tokens=self.max_kv_tokens,
            token_usage=used / self.max_kv_tokens,
            pending_prefill_tokens=self._pending_prefill,
            cache_hit_rate=self.cache_hit_rate,
            num_retracted=self.num_retracted,
            gen_throughput=self.gen_throughput,
            evictable_kv_tokens=evictable,
            new_token_ratio=self.new_token_ratio,
        )

    def flush_cache(self) -> bool:
        """Drop the prefix cache; like SGLang, refused (False) while requests are queued or running."""
        if self.has_work():
            return False
        self.cache.reset()
        return True

    def set_slowdown(self, factor: float) -> None:
        """Make every later step take `factor` times as long (e.g. a throttled or shared GPU)."""
        if factor <= 0:
            raise ValueError("slowdown must be > 0")
        self.slowdown = factor

    def clone(self) -> Engine:
        """An independent copy in the same state (for look-ahead simulation)."""
        c = copy.copy(self)
        c.cache = self.cache.clone()
        mapping = {id(r): copy.copy(r) for r in (*self.waiting, *self.running.values())}
        if self.chunked is not None:
            mapping[id(self.chunked)] = copy.copy(self.chunked)
        c.waiting = [mapping[id(r)] for r in self.waiting]
        c.running = {rid: mapping[id(r)] for rid, r in self.running.items()}
        c._big = {rid: mapping[id(r)] for rid, r in self._big.items()}
        c._finish_heap = [(fc, seq, mapping[id(r)], epoch) for fc, seq, r, epoch in self._finish_heap
                          if epoch == r.epoch]
        heapq.heapify(c._finish_heap)
        c.chunked = mapping[id(self.chunked)] if self.chunked is not None else None
        c._pending_aborts = list(self._pending_aborts)
        c._rng = random.Random()
        c._rng.setstate(self._rng.getstate())
        return c

