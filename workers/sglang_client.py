"""An async client for one SGLang engine's HTTP API (SGLang 0.5.x, or the emulator that speaks it).

Generation: `POST /generate` with `stream: true`. The engine answers with server-sent events, one
`data: {...}` per step carrying the cumulative `text` and a `meta_info` with `prompt_tokens`,
`completion_tokens`, `cached_tokens` and `finish_reason`, then `data: [DONE]`. An input it refuses
arrives either as HTTP 400 before the stream or as `data: {"error": {...}}` inside it.

Measurements (all from the first attempt's send, so retries count against the request):
- TTFT at the first chunk that carries output (non-empty text or completion_tokens >= 1);
- E2E at the last data chunk;
- TPOT = (E2E - TTFT) / (completion_tokens - 1), undefined for fewer than two tokens.

Retries: 502/503/504 and connection failures are retried with exponential backoff (RetryPolicy);
a refused input (400/413/422 or an in-stream error) is never retried.

Load: `GET /v1/loads` (per-DP-rank loads), falling back to `GET /get_load`, then to the Prometheus
text of `GET /metrics`; the first endpoint that answers is remembered and tried first next time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lodestar.schemas import InferenceRequest, now_ms

RETRYABLE_STATUS = frozenset({502, 503, 504})
REJECTED_STATUS = frozenset({400, 413, 422})
LOAD_ENDPOINTS = ("/v1/loads", "/get_load", "/metrics")


class EngineError(Exception):
    """The engine did not produce a result for a request."""

    retryable = False

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class EngineRejected(EngineError):
    """The engine refused the request's input (HTTP 400 or an in-stream error): never retried."""


class EngineUnavailable(EngineError):
    """The engine is overloaded or unreachable (503, connection failure): worth retrying."""

    retryable = True


class EngineUnauthorized(EngineError):
    """The engine refused this worker's API key (HTTP 401/403): a configuration error, never retried."""


UNAUTHORIZED_STATUS = frozenset({401, 403})


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries with exponential backoff: `attempts` retries after the first try."""

    attempts: int
    backoff_s: float

    def delays(self) -> Iterator[float]:
        """The pause before each retry: backoff_s, 2*backoff_s, 4*backoff_s, ..."""
        for n in range(self.attempts):
            yield self.backoff_s * (2**n)


@dataclass(frozen=True)
class Generation:
    """What one streamed generation produced and how long it took."""

    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str | None
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float
    sent_at_ms: float
    first_token_at_ms: float | None
    attempts: int


class StreamMeter:
    """Accumulates one request's stream chunks and times them against a monotonic clock."""

    def __init__(
        self,
        clock: Callable[[], float] = time.perf_counter,
        wall_ms: Callable[[], float] = now_ms,
        on_first_token: Callable[[], None] | None = None,
    ):
        self._clock = clock
        self._wall_ms = wall_ms
        self._on_first_token = on_first_token
        self._start = clock()
        self.sent_at_ms = wall_ms()
        self.attempts = 0
        self._reset_output()

    def _reset_output(self) -> None:
        self.text = ""
        self.meta: dict[str, Any] = {}
        self._first: float | None = None
        self._last: float | None = None
        self.first_token_at_ms: float | None = None

    def new_attempt(self) -> None:
        """Forget a failed attempt's partial output (the clock keeps running from the first send)."""
        self.attempts += 1
        self._reset_output()

    def observe(self, chunk: dict[str, Any]) -> None:
        """Record one `data:` chunk: cumulative text plus meta_info."""
        now = self._clock()
        self._last = now
        text = chunk.get("text")
        if isinstance(text, str):
            # SGLang streams the cumulative text by default; an engine run with incremental
            # output sends only the new piece, which does not extend what we hold.
            self.text = text if text.startswith(self.text) else self.text + text
        meta = chunk.get("meta_info")
        if isinstance(meta, dict):
            self.meta = meta
        if self._first is None and (self.text or _int(self.meta.get("completion_tokens")) > 0):
            self._first = now
            self.first_token_at_ms = self._wall_ms()
            if self._on_first_token is not None:
                self._on_first_token()
                self._on_first_token = None

    def result(self) -> Generation:
        """The measurements once the stream has ended."""
        end = self._last if self._last is not None else self._clock()
        e2e_ms = (end - self._start) * 1000.0
        ttft_ms = (self._first - self._start) * 1000.0 if self._first is not None else None
        completion = _int(self.meta.get("completion_tokens"))
        tpot_ms = None
        if ttft_ms is not None and completion > 1:
            tpot_ms = max(e2e_ms - ttft_ms, 0.0) / (completion - 1)
        return Generation(
            text=self.text,
            prompt_tokens=_int(self.meta.get("prompt_tokens")),
            cached_tokens=_int(self.meta.get("cached_tokens")),
            completion_tokens=completion,
            finish_reason=finish_reason_type(self.meta.get("finish_reason")),
            ttft_ms=ttft_ms,
            tpot_ms=tpot_ms,
            e2e_ms=e2e_ms,
            sent_at_ms=self.sent_at_ms,
            first_token_at_ms=self.first_token_at_ms,
            attempts=self.attempts,
        )


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and math.isfinite(value) and value >= 0 else 0


def _fraction(value: Any) -> float:
    """A usage fraction as the engine reports it; anything not a finite number counts as 0."""
    try:
        number = float(value or 0.0)
    except (TypeError, ValueError):
        return 0.0
    return number if math.isfinite(number) else 0.0


def finish_reason_type(reason: Any) -> str | None:
    """SGLang's finish_reason is `{"type": "stop"|"length"|"abort", ...}` (or a plain string)."""
    if isinstance(reason, dict):
        kind = reason.get("type")
        return str(kind) if kind is not None else None
    return str(reason) if reason is not None else None


def check_abort(meta: dict[str, Any]) -> None:
    """Raise if the engine aborted the request (finish_reason type "abort")."""
    reason = meta.get("finish_reason")
    if not isinstance(reason, dict) or reason.get("type") != "abort":
        return
    message = str(reason.get("message") or "aborted by the engine")
    status = reason.get("status_code")
    status = status if isinstance(status, int) else None
    if status in RETRYABLE_STATUS:
        raise EngineUnavailable(message, status)
    if status is not None and 400 <= status < 500:
        raise EngineRejected(message, status)
    raise EngineError(message, status)


async def sse_data(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    """Decode `data: {...}` events until `data: [DONE]`; comments and other fields are skipped."""
    async for raw in lines:
        line = raw.strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except json.JSONDecodeError as exc:
            raise EngineError(f"undecodable stream event: {data[:200]!r}") from exc
        if not isinstance(event, dict):
            raise EngineError(f"stream event is not an object: {data[:200]!r}")
        yield event


def generate_payload(request: InferenceRequest) -> dict[str, Any]:
    """The `/generate` body for a request: input_ids if it has them, else text; streaming on; the request's
    `priority` when it has one (SGLang schedules by it when run with `--enable-priority-scheduling`)."""
    body: dict[str, Any] = {"sampling_params": request.sampling.model_dump(), "stream": True}
    if request.input_ids:
        body["input_ids"] = list(request.input_ids)
    else:
        body["text"] = request.prompt
    if request.priority is not None:
        body["priority"] = request.priority
    return body


@dataclass(frozen=True)
class EngineLoad:
    """The engine's own view of its load."""

    running: int
    waiting: int
    kv_usage: float
    max_kv_tokens: int
    source: str


def parse_v1_loads(body: Any) -> EngineLoad:
    """`/v1/loads`: `{"loads": [{num_running_reqs, num_waiting_reqs, token_usage, ...}, ...]}`."""
    loads = body.get("loads") if isinstance(body, dict) else None
    if not isinstance(loads, list) or not loads:
        raise ValueError("/v1/loads answer has no `loads` list")
    ranks = [d for d in loads if isinstance(d, dict)]
    return EngineLoad(
        running=sum(_int(d.get("num_running_reqs")) for d in ranks),
        waiting=sum(_int(d.get("num_waiting_reqs")) for d in ranks),
        kv_usage=max((_fraction(d.get("token_usage")) for d in ranks), default=0.0),
        max_kv_tokens=sum(_int(d.get("max_total_num_tokens")) for d in ranks),
        source="/v1/loads",
    )


def parse_get_load(body: Any, max_kv_tokens: int) -> EngineLoad:
    """`/get_load`: a list (one per DP rank) of `{num_reqs, num_waiting_reqs, num_tokens}`.

    `num_reqs` counts running and waiting requests together; KV usage is known only when the
    token capacity is (from an earlier /v1/loads or /metrics answer).
    """
    ranks = body if isinstance(body, list) else [body]
    ranks = [d for d in ranks if isinstance(d, dict)]
    if not ranks or not any("num_reqs" in d for d in ranks):
        raise ValueError("/get_load answer has no `num_reqs`")
    total = sum(_int(d.get("num_reqs")) for d in ranks)
    waiting = sum(_int(d.get("num_waiting_reqs")) for d in ranks)
    used = sum(_int(d.get("num_tokens")) for d in ranks)
    return EngineLoad(
        running=max(total - waiting, 0),
        waiting=waiting,
        kv_usage=used / max_kv_tokens if max_kv_tokens else 0.0,
        max_kv_tokens=max_kv_tokens,
        source="/get_load",
    )


def parse_metrics(text: str) -> EngineLoad:
    """SGLang's Prometheus gauges: num_running_reqs, num_queue_reqs, token_usage, max_total_num_tokens.

    Samples of one DP rank (tensor-parallel ranks repeat the same value) count once; DP ranks add up.
    """
    per_rank: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removeprefix("sglang:")
            if name not in ("num_running_reqs", "num_queue_reqs", "token_usage", "max_total_num_tokens"):
                continue
            rank = per_rank.setdefault(sample.labels.get("dp_rank", ""), {})
            rank[name] = max(rank.get(name, 0.0), float(sample.value))
    if not any("num_running_reqs" in r for r in per_rank.values()):
        raise ValueError("/metrics has no sglang:num_running_reqs")
    ranks = per_rank.values()
    return EngineLoad(
        running=int(sum(r.get("num_running_reqs", 0.0) for r in ranks)),
        waiting=int(sum(r.get("num_queue_reqs", 0.0) for r in ranks)),
        kv_usage=max((_fraction(r.get("token_usage")) for r in ranks), default=0.0),
        max_kv_tokens=int(sum(r.get("max_total_num_tokens", 0.0) for r in ranks)),
        source="/metrics",
    )


class SGLangClient:
    """Streaming generation and load polling against one engine."""

    def __init__(
        self,
        base_url: str,
        *,
        request_timeout_s: float,
        retry: RetryPolicy,
        load_timeout_s: float = 2.0,
        api_key: str | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        clock: Callable[[], float] = time.perf_counter,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ):
        self._http = httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            timeout=httpx.Timeout(request_timeout_s, connect=min(5.0, request_timeout_s)),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            # SGLang's --api-key: every API route wants it as a Bearer token (/health and /metrics do not)
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            transport=transport,
        )
        self._retry = retry
        self._load_timeout_s = load_timeout_s
        self._clock = clock
        self._sleep = sleep
        self._load_order: list[str] = list(LOAD_ENDPOINTS)
        self._max_kv_tokens = 0

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def generate(
        self, request: InferenceRequest, on_first_token: Callable[[], None] | None = None
    ) -> Generation:
        """Stream one generation, retrying an unavailable engine; raises EngineError when it gives up.

        `on_first_token` is called once, when the first output arrives (the end of the prefill).
        """
        payload = generate_payload(request)
        meter = StreamMeter(self._clock, on_first_token=on_first_token)
        delays = self._retry.delays()
        while True:
            meter.new_attempt()
            try:
                await self._stream_once(payload, meter)
                return meter.result()
            except EngineError as exc:
                if not exc.retryable:
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise EngineUnavailable(f"{exc} (gave up after {meter.attempts} attempts)", exc.status) from exc
                await self._sleep(delay)

    async def _stream_once(self, payload: dict[str, Any], meter: StreamMeter) -> None:
        try:
            async with self._http.stream("POST", "/generate", json=payload) as response:
                if response.status_code != 200:
                    body = (await response.aread()).decode("utf-8", "replace")[:500]
                    raise _status_error(response.status_code, body)
                async for event in sse_data(response.aiter_lines()):
                    error = event.get("error")
                    if error is not None:
                        message = error.get("message") if isinstance(error, dict) else error
                        raise EngineRejected(f"engine refused the request: {message}")
                    meter.observe(event)
                    check_abort(meter.meta)
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
            raise EngineError(f"engine timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine connection failed: {exc!r}") from exc
        if not meter.meta:
            raise EngineError("stream ended without any output")

    async def load(self) -> EngineLoad:
        """The engine's load from the first endpoint that answers; raises EngineError if none does."""
        failures: list[str] = []
        for path in list(self._load_order):
            try:
                load = await self._load_from(path)
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code in UNAUTHORIZED_STATUS:  # not a missing endpoint: do not fall back
                    raise _status_error(exc.response.status_code, exc.response.text[:200]) from exc
                failures.append(f"{path}: {exc!r}")
                continue
            except (httpx.HTTPError, ValueError) as exc:
                failures.append(f"{path}: {exc!r}")
                continue
            if load.max_kv_tokens:
                self._max_kv_tokens = load.max_kv_tokens
            self._load_order.remove(path)
            self._load_order.insert(0, path)
            return load
        raise EngineUnavailable("no load endpoint answered: " + "; ".join(failures))

    async def _load_from(self, path: str) -> EngineLoad:
        response = await self._http.get(path, timeout=self._load_timeout_s)
        response.raise_for_status()
        if path == "/v1/loads":
            return parse_v1_loads(response.json())
        if path == "/get_load":
            return parse_get_load(response.json(), self._max_kv_tokens)
        return parse_metrics(response.text)


def _status_error(status: int, body: str) -> EngineError:
    message = f"engine answered HTTP {status}: {body}"
    if status in UNAUTHORIZED_STATUS:
        return EngineUnauthorized(f"{message} (worker.engine_api_key must be the engine's --api-key)", status)
    if status in RETRYABLE_STATUS:
        return EngineUnavailable(message, status)
    if status in REJECTED_STATUS:
        return EngineRejected(message, status)
    return EngineError(message, status)
