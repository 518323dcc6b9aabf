"""An async client for one SGLang engine's HTTP API (SGLang 0.5.x, or the emulator that speaks it).

Generation: `POST /generate` with `stream: true`. The engine answers with server-sent events, one
`data: {...}` per step carrying the cumulative `text` and a `meta_info` with `prompt_tokens`,
`completion_tokens`, `cached_tokens` and `finish_reason`, then `data: [DONE]`. An input it refuses
arrives either as HTTP 400 before the stream or as `data: {"error": {...}}` inside it.

Measurements (all from the first attempt's send, so retries count against the request):
- TTFT at the first chunk that carries output (non-empty text or completion_tokens >= 1);
- E2E at the last data chunk;
- TPOT = (E2E - TTFT) / (completion_tokens - 1), undefined for fewer than two tokens.

Retries: 408/429/500/502/503/504 and connection failures are retried with jittered backoff within a
budget (workers/retry.py);
a refused input (400/413/422 or an in-stream error) is never retried.

Load: `GET /v1/loads` (per-DP-rank loads), falling back to `GET /get_load`, then to the Prometheus
text of `GET /metrics`; the first endpoint that answers is remembered and tried first next time.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from lodestar.http_transport import aiohttp_transport
from lodestar.schemas import InferenceRequest, now_ms
from workers.retry import RETRYABLE_STATUS, RetryPolicy

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
    """The engine is overloaded, failing or unreachable (408/429/5xx, connection failure): worth retrying."""

    retryable = True


class EngineUnauthorized(EngineError):
    """The engine refused this worker's API key (HTTP 401/403): a configuration error, never retried."""


UNAUTHORIZED_STATUS = frozenset({401, 403})


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
        text = chunk.get("text")
        if isinstance(text, str):
            # SGLang streams the cumulative text by default; an engine run with incremental
            # output sends only the new piece, which does not extend what we hold.
            self.text = text if text.startswith(self.text) else self.text + text
        meta = chunk.get("meta_info")
        if isinstance(meta, dict):
            self.meta = meta
        self.tick(bool(self.text) or _int(self.meta.get("completion_tokens")) > 0)

    def tick(self, output: bool) -> None:
        """An event arrived now; `output`: it carries generated output (the first such one is the first token)."""
        now = self._clock()
        self._last = now
        if self._first is None and output:
            self._first = now
            self.first_token_at_ms = self._wall_ms()
            if self._on_first_token is not None:
                self._on_first_token()
                self._on_first_token = None

    @property
    def started_output(self) -> bool:
        """Whether the first token has arrived."""
        return self._first is not None

    def result(self, text: str | None = None, meta: dict[str, Any] | None = None) -> Generation:
        """The measurements once the stream has ended; the text and the token counts (`prompt_tokens`,
        `cached_tokens`, `completion_tokens`, `finish_reason`) are the native chunks' unless given."""
        text = self.text if text is None else text
        meta = self.meta if meta is None else meta
        end = self._last if self._last is not None else self._clock()
        e2e_ms = (end - self._start) * 1000.0
        ttft_ms = (self._first - self._start) * 1000.0 if self._first is not None else None
        completion = _int(meta.get("completion_tokens"))
        tpot_ms = None
        if ttft_ms is not None and completion > 1:
            tpot_ms = max(e2e_ms - ttft_ms, 0.0) / (completion - 1)
        return Generation(
            text=text,
            prompt_tokens=_int(meta.get("prompt_tokens")),
            cached_tokens=_int(meta.get("cached_tokens")),
            completion_tokens=completion,
            finish_reason=finish_reason_type(meta.get("finish_reason")),
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


async def sse_events(chunks: AsyncIterator[bytes]) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """Decode `data: {...}` events until `data: [DONE]`, each as its JSON text and the object it holds, from the
    body's bytes as they arrive (split into lines here: a layer of line iterators per event cost as much as the
    rest of the worker's work on it); comments and other fields are skipped. The body is read to its end
    (nothing follows [DONE]), so that the connection goes back to the pool instead of being closed half-read."""
    done = False
    rest = b""
    async for chunk in chunks:
        rest += chunk
        *lines, rest = rest.split(b"\n")
        for raw in lines:
            if done or not raw.startswith(b"data:"):
                continue
            data = raw[5:].strip().decode("utf-8", "replace")
            if data == "[DONE]":
                done = True
                continue
            try:
                event = json.loads(data)
            except json.JSONDecodeError as exc:
                raise EngineError(f"undecodable stream event: {data[:200]!r}") from exc
            if not isinstance(event, dict):
                raise EngineError(f"stream event is not an object: {data[:200]!r}")
            yield data, event


async def sse_data(chunks: AsyncIterator[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The objects of `sse_events`."""
    async for _, event in sse_events(chunks):
        yield event


def error_message(body: str) -> str:
    """The message of an engine's error body (SGLang's `{"message": ...}` or `{"error": {"message": ...}}`),
    else the body itself."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return body
    if isinstance(obj, dict):
        inner = obj.get("error")
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return inner["message"]
        if isinstance(obj.get("message"), str):
            return obj["message"]
        if isinstance(inner, str):
            return inner
    return body


def in_stream_error(error: Any) -> EngineError:
    """The error an engine sent inside its stream (`{"error": {"message", "code"}}`): a 5xx code is the engine
    failing or overloaded (503 retryable), anything else it refusing the input."""
    message = error.get("message") if isinstance(error, dict) else error
    code = error.get("code") if isinstance(error, dict) else None
    status = code if isinstance(code, int) and not isinstance(code, bool) and 100 <= code <= 599 else None
    text = str(message)[:2000]
    if status in RETRYABLE_STATUS:
        return EngineUnavailable(text, status)
    if status is not None and status >= 500:
        return EngineError(text, status)
    return EngineRejected(text, status or 400)


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
            # SGLang's --api-key: every API route wants it as a Bearer token (/health and /metrics do not)
            headers={"Authorization": f"Bearer {api_key}"} if api_key else None,
            # aiohttp's pool and parser: half the CPU of httpx's own per streamed response (lodestar/http_transport.py)
            transport=transport or aiohttp_transport(),
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
        async for _, event in self._events_once("/generate", payload, verbatim=False):
            meter.observe(event)
            check_abort(meter.meta)
        if not meter.meta:
            raise EngineError("stream ended without any output")

    async def stream_events(self, path: str, body: dict[str, Any], meter: StreamMeter
                            ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """Stream one engine call (`body` asks for a stream), yielding each event as its JSON text and object.

        An unavailable engine is retried (RetryPolicy) until the first event arrives; after that an error is
        raised, since the events so far are already out. A refused input (an HTTP 4xx, or an in-stream error
        with a 4xx code) raises EngineRejected with the engine's own message and status."""
        delays = self._retry.delays()
        while True:
            meter.new_attempt()
            yielded = False
            try:
                async for item in self._events_once(path, body):
                    yielded = True
                    yield item
                if not yielded:
                    raise EngineError("stream ended without any output")
                return
            except EngineError as exc:
                if yielded or not exc.retryable:
                    raise
                delay = next(delays, None)
                if delay is None:
                    raise EngineUnavailable(f"{exc} (gave up after {meter.attempts} attempts)", exc.status) from exc
                await self._sleep(delay)

    async def _events_once(self, path: str, body: dict[str, Any], verbatim: bool = True
                           ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """One streamed call's events; an HTTP error carries the engine's own message (`verbatim`), or its
        status and body."""
        try:
            async with self._http.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode("utf-8", "replace")[:4000]
                    raise _status_error(response.status_code, error_message(text) if verbatim else text[:500],
                                        verbatim=verbatim)
                async for data, event in sse_events(response.aiter_bytes()):
                    if event.get("error") is not None:
                        raise in_stream_error(event["error"])
                    yield data, event
        except httpx.TimeoutException as exc:
            if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
                raise EngineUnavailable(f"engine unreachable: {exc!r}") from exc
            raise EngineError(f"engine timed out: {exc!r}") from exc
        except httpx.TransportError as exc:
            raise EngineUnavailable(f"engine connection failed: {exc!r}") from exc

    async def abort(self, rid: str) -> bool:
        """Ask the engine to stop a request (SGLang's `POST /abort_request`); False if it did not answer 200."""
        try:
            response = await self._http.post("/abort_request", json={"rid": rid}, timeout=self._load_timeout_s)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

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


def _status_error(status: int, body: str, *, verbatim: bool = False) -> EngineError:
    """The error of a non-200 answer; its message is the body (`verbatim`: the engine's words, for a client) or
    says where it came from."""
    message = body if verbatim else f"engine answered HTTP {status}: {body}"
    if status in UNAUTHORIZED_STATUS:
        return EngineUnauthorized(f"engine answered HTTP {status}: {body} (worker.engine_api_key must be the "
                                  "engine's --api-key)", status)
    if status in RETRYABLE_STATUS:
        return EngineUnavailable(message, status)
    if status in REJECTED_STATUS:
        return EngineRejected(message, status)
    return EngineError(message, status)
