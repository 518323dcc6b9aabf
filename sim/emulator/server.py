"""The emulator's HTTP server: SGLang 0.5.x's native endpoints on a Starlette app, plus the OpenAI routes.

Native endpoints: POST /generate, GET /health and /health_generate, /server_info and /get_server_info,
/model_info and /get_model_info, /v1/loads and /get_load, GET|POST /flush_cache, POST /abort_request,
GET /metrics. OpenAI-compatible ones live in `sim.emulator.openai_api`. docs/emulator.md lists every
response shape and where the emulator knowingly differs from SGLang.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lodestar.hardware import model as model_spec
from sim.emulator import openai_api, openai_responses, openai_score
from sim.emulator.emulator import QUEUE_FULL_MESSAGE, Emulator, EmulatorConfig, Generation, PreparedRequest, Sample
from sim.emulator.native_input import parse_generate_body
from sim.emulator.responses import (
    SSE_DONE,
    BadRequest,
    PayloadTooLarge,
    error_response,
    event_stream,
    events,
    json_response,
    native_error,
    read_json_object,
    sse,
    wait_unless_disconnected,
)
from sim.engine import QueueFull

SGLANG_VERSION = "0.5.5"  # the SGLang release whose API the emulator speaks
WARMUP_TEXT = "The capital city of France is"  # SGLang's warmup prompt
GC_GEN0_THRESHOLD = 20_000  # allocations between young-generation collections (CPython's default: 700)
HEALTH_CHECK_TIMEOUT_S = 20.0
logger = logging.getLogger(__name__)
LOAD_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key, as SGLang does


def create_app(emulator: Emulator) -> Starlette:
    """A Starlette app serving `emulator`; its lifespan starts and stops the engine runner."""

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        emulator.runner.start()
        try:
            yield
        finally:
            await emulator.runner.stop()

    native = _NativeRoutes(emulator)
    routes = [
        Route("/generate", native.generate, methods=["POST", "PUT"]),
        Route("/health", native.health, methods=["GET"]),
        Route("/health_generate", native.health_generate, methods=["GET"]),
        Route("/model_info", native.model_info, methods=["GET"]),
        Route("/get_model_info", native.model_info, methods=["GET"]),
        Route("/server_info", native.server_info, methods=["GET"]),
        Route("/get_server_info", native.server_info, methods=["GET"]),
        Route("/v1/loads", native.loads, methods=["GET"]),
        Route("/get_load", native.get_load, methods=["GET"]),
        Route("/flush_cache", native.flush_cache, methods=["GET", "POST"]),
        Route("/abort_request", native.abort_request, methods=["POST"]),
        Route("/metrics", native.metrics, methods=["GET"]),
        *openai_api.routes(emulator),
        *openai_responses.routes(emulator),
        *openai_score.routes(emulator),
    ]
    config = emulator.config
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(_Guard, api_key=config.api_key, max_payload_size=config.max_payload_size)],
                    exception_handlers={HTTPException: _http_exception, BadRequest: _bad_request,
                                        PayloadTooLarge: _too_large})
    app.state.emulator = emulator
    app.state.max_payload_size = config.max_payload_size
    return app


async def _http_exception(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(str(exc.detail), str(exc.status_code), exc.status_code)


async def _bad_request(_: Request, exc: Exception) -> Response:
    return error_response(str(exc), "Bad Request", 400)


async def _too_large(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, PayloadTooLarge)
    return error_response(str(exc), "Payload Too Large", 413)


def _bearer_matches(authorization: bytes, key: bytes) -> bool:
    """`Bearer <key>`, the scheme in any case (RFC 6750, as SGLang's middleware reads it), compared in constant time."""
    scheme, _, token = authorization.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key)


class _Guard:
    """In front of every route, as SGLang's middlewares: with an API key, a request without
    `Authorization: Bearer <key>` gets 401 (except /health* and /metrics); a body whose Content-Length
    exceeds max_payload_size gets 413 before it is read (read_json_object bounds bodies without one)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_payload_size: int) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None
        self.max_payload_size = max_payload_size

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        path = scope["path"]
        if (self.expected is not None and scope["method"] != "OPTIONS" and not path.startswith(OPEN_PATHS)
                and not _bearer_matches(headers.get(b"authorization", b""), self.expected)):
            await JSONResponse({"error": "Unauthorized"}, status_code=401)(scope, receive, send)
            return
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_payload_size:
            response = await _too_large(Request(scope), PayloadTooLarge(self.max_payload_size))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


class _NativeRoutes:
    """Handlers of SGLang's native API for one emulator."""

    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator

    # ---- generation -------------------------------------------------------------------------

    async def generate(self, request: Request) -> Response:
        """POST /generate: one prompt or a batch (`text` / `input_ids`), `sampling_params` (with `n`),
        logprob options, `stream`, optional `rid`, `log_metrics`, `cache_salt`."""
        received = time.perf_counter()
        body = await read_json_object(request)
        emu = self.emu
        stream = bool(body.get("stream", False))
        log_metrics = body.get("log_metrics") is not False
        try:
            inp = parse_generate_body(body, emu.card.vocab)
            texts = inp.texts or [None] * inp.size
            ids = inp.input_ids or [None] * inp.size
            prepared = [emu.prepare(t, i, sp, lp, inp.cache_salt)
                        for t, i, sp, lp in zip(texts, ids, inp.sampling_params, inp.logprobs, strict=True)]
        except ValueError as exc:
            return self._bad_request(str(exc), stream)
        if not inp.batch and prepared[0].n == 1:
            rid = inp.rids[0] if inp.rids else uuid.uuid4().hex
            return await self._generate_one(request, received, rid, prepared[0], stream, log_metrics)
        try:
            gen = await emu.generate(prepared, inp.rids if prepared[0].n == 1 else None, log_metrics, received)
        except QueueFull:
            if stream:
                return event_stream(events(sse(emu.reject(uuid.uuid4().hex, len(prepared[0].input_ids))), SSE_DONE))
            emu.metrics.on_abort()
            return error_response(QUEUE_FULL_MESSAGE, "503", 503)
        except ValueError as exc:
            return self._bad_request(str(exc), stream)
        if stream:
            return event_stream(self._stream_many(gen))
        if not await wait_unless_disconnected(request, gen.wait):
            gen.abort("Request is disconnected from the client side.")
            return Response(status_code=499)
        for s in gen.samples:
            reason = s.state.finish_reason or {}
            if reason.get("type") == "abort" and reason.get("status_code"):
                code = int(reason["status_code"])
                return error_response(str(reason.get("message")), str(code), code)
        return Response(b"[" + b",".join(emu.output_json(s) for s in gen.samples) + b"]",
                        media_type="application/json")

    @staticmethod
    def _bad_request(message: str, stream: bool) -> Response:
        if stream:  # SGLang reports stream errors in-band
            return event_stream(events(sse({"error": {"message": message}}), SSE_DONE))
        return native_error(message)

    async def _generate_one(self, request: Request, received: float, rid: str, prepared: PreparedRequest,
                            stream: bool, log_metrics: bool) -> Response:
        emu = self.emu
        try:
            state = emu.submit(rid, prepared, log_metrics=log_metrics, received_wall=received)
        except QueueFull:
            if stream:
                return event_stream(events(sse(emu.reject(rid, len(prepared.input_ids))), SSE_DONE))
            emu.metrics.on_abort()
            return error_response(QUEUE_FULL_MESSAGE, "503", 503)
        except ValueError as exc:
            return self._bad_request(str(exc), stream)
        sample = Sample(0, prepared, state)
        if stream:
            return event_stream(self._stream(sample))
        if not await wait_unless_disconnected(request, state.wait_finished):
            emu.runner.abort(rid, "Request is disconnected from the client side.")
            return Response(status_code=499)
        reason = state.finish_reason or {}
        if reason.get("type") == "abort" and reason.get("status_code"):
            code = int(reason["status_code"])
            return error_response(str(reason.get("message")), str(code), code)
        return Response(emu.output_json(sample), media_type="application/json")

    async def _stream(self, sample: Sample) -> AsyncIterator[bytes]:
        emu = self.emu
        state = sample.state
        try:
            async for _ in emu.updates(state):
                yield b"data: " + emu.output_json(sample) + b"\n\n"
            yield SSE_DONE
        finally:
            if not state.finished:  # the client went away mid-stream
                emu.runner.abort(state.rid, "Request is disconnected from the client side.")

    async def _stream_many(self, gen: Generation) -> AsyncIterator[bytes]:
        """Each sample's cumulative output as it changes, tagged with its `index` in the request."""
        emu = self.emu
        try:
            async for sample in gen.updates():
                yield b"data: " + emu.output_json(sample, index=True) + b"\n\n"
            yield SSE_DONE
        finally:
            if not gen.finished:
                gen.abort("Request is disconnected from the client side.")

    async def abort_request(self, request: Request) -> Response:
        """POST /abort_request: `{"rid": ..., "abort_all": false}`."""
        body = await read_json_object(request)
        runner = self.emu.runner
        if body.get("abort_all"):
            for rid in list(runner.states):
                runner.abort(rid, "Aborted by an abort_all request.")
        elif isinstance(body.get("rid"), str):
            runner.abort(body["rid"], "Aborted by an AbortReq.")
        return Response(status_code=200)

    # ---- health -----------------------------------------------------------------------------

    async def health(self, _: Request) -> Response:
        """GET /health: 200 once warmed up and while the engine runner is alive, else 503."""
        return Response(status_code=200 if self.emu.ready and self.emu.runner.healthy else 503)

    async def health_generate(self, _: Request) -> Response:
        """GET /health_generate: like SGLang, run a one-token generation when the engine is idle."""
        emu = self.emu
        if not emu.runner.healthy:
            return Response(status_code=503)
        if emu.engine.has_work():
            return Response(status_code=200)
        prepared = emu.prepare(None, [0], {"max_new_tokens": 1, "temperature": 0.0})
        try:
            state = emu.submit(f"HEALTH_CHECK_{time.time()}", prepared, log_metrics=False)
        except QueueFull:
            return Response(status_code=200)  # the queue is full of work: the engine is alive
        try:
            await asyncio.wait_for(state.wait_finished(), HEALTH_CHECK_TIMEOUT_S)
        except TimeoutError:
            emu.runner.abort(state.rid)
            return Response(status_code=503)
        return Response(status_code=200)

    # ---- information ------------------------------------------------------------------------

    async def model_info(self, _: Request) -> Response:
        """GET /model_info (and /get_model_info)."""
        card = self.emu.card
        return json_response({
            "model_path": card.hf_path,
            "tokenizer_path": card.hf_path,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": "default",
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": card.model_type,
            "architectures": [card.architecture],
        })

    async def server_info(self, _: Request) -> Response:
        """GET /server_info (and /get_server_info): server args, scheduler info, internal states."""
        emu = self.emu
        cfg = emu.engine.cfg
        c: EmulatorConfig = emu.config
        load = emu.engine.load()
        weight_gb, kv_gb = self._memory_gb()
        return json_response({
            "model_path": emu.card.hf_path,
            "tokenizer_path": emu.card.hf_path,
            "served_model_name": emu.served_model_name,
            "host": c.host,
            "port": c.port,
            "context_length": emu.context_len,
            "mem_fraction_static": cfg.mem_fraction_static,
            "max_running_requests": emu.engine.max_running_requests,
            "max_queued_requests": cfg.max_queued_requests,
            "max_total_tokens": None,
            "chunked_prefill_size": cfg.chunked_prefill_size,
            "max_prefill_tokens": cfg.max_prefill_tokens,
            "schedule_policy": cfg.schedule_policy,
            "schedule_conservativeness": cfg.schedule_conservativeness,
            "page_size": c.block_tokens,
            "disable_radix_cache": cfg.disable_radix_cache,
            "enable_mixed_chunk": cfg.enable_mixed_chunk,
            "cuda_graph_max_bs": cfg.cuda_graph_max_bs,
            "tp_size": cfg.tp_size,
            "dp_size": 1,
            "random_seed": c.seed,
            "enable_cache_report": c.enable_cache_report,
            "enable_metrics": True,
            "stream_interval": 1,
            "stream_output": False,
            "skip_tokenizer_init": False,
            "device": "cuda",
            "dtype": "auto",
            "kv_cache_dtype": "auto",
            "max_total_num_tokens": emu.engine.max_kv_tokens,
            "max_req_input_len": min(emu.context_len, emu.engine.max_kv_tokens) - 1,
            "internal_states": [{
                "last_gen_throughput": load.gen_throughput,
                "memory_usage": {"weight": weight_gb, "kvcache": kv_gb, "token_capacity": emu.engine.max_kv_tokens,
                                 "graph": 0.0},
            }],
            "version": SGLANG_VERSION,
            "emulator": {"gpu_type": emu.engine.gpu_type, "model": emu.engine.model_name,
                         "time_scale": c.time_scale, "block_tokens": c.block_tokens,
                         "steps": emu.runner.steps, "lag_s": emu.runner.lag_s, "max_lag_s": emu.runner.max_lag_s},
        })

    def _memory_gb(self) -> tuple[float, float]:
        spec = model_spec(self.emu.engine.model_name)
        weight = spec.weight_bytes / 1024**3
        kv = self.emu.engine.max_kv_tokens * spec.kv_bytes_per_token / 1024**3
        return round(weight, 2), round(kv, 2)

    def _load_dict(self, include: set[str] | None) -> dict[str, Any]:
        emu = self.emu
        load = emu.engine.load()
        core: dict[str, Any] = {
            "dp_rank": 0,
            "timestamp": time.time(),
            "num_running_reqs": load.running,
            "num_waiting_reqs": load.waiting,
            "num_used_tokens": load.used_kv_tokens,
            "num_total_tokens": load.used_kv_tokens + load.pending_prefill_tokens,
            "num_waiting_uncached_tokens": load.pending_prefill_tokens,
            "max_total_num_tokens": load.max_kv_tokens,
            "token_usage": round(load.token_usage, 4),
            "gen_throughput": round(load.gen_throughput, 2),
            "cache_hit_rate": round(load.cache_hit_rate, 4),
            "utilization": round(load.token_usage, 4),
            "max_running_requests": emu.engine.max_running_requests,
        }
        everything = include is None or "all" in include
        if everything or "memory" in include:
            weight_gb, kv_gb = self._memory_gb()
            core["memory"] = {"weight_gb": weight_gb, "kv_cache_gb": kv_gb, "graph_gb": 0.0,
                              "token_capacity": load.max_kv_tokens}
        if everything or "queues" in include:
            core["queues"] = {"waiting": load.waiting, "grammar": 0, "paused": 0, "retracted": load.num_retracted}
        core["num_total_reqs"] = load.running + load.waiting
        return core

    async def loads(self, request: Request) -> Response:
        """GET /v1/loads[?include=core,memory,queues|all][&format=prometheus][&dp_rank=0]."""
        q = request.query_params
        include = {s.strip() for s in q["include"].split(",")} if q.get("include") else None
        if include is not None and not include <= LOAD_SECTIONS:
            bad = sorted(include - LOAD_SECTIONS)
            return error_response(f"Invalid include sections: {bad}. Valid options: {sorted(LOAD_SECTIONS)}",
                                  "400", 400)
        loads = [] if q.get("dp_rank") not in (None, "0") else [self._load_dict(include)]
        if q.get("format") == "prometheus":
            return PlainTextResponse(_loads_prometheus(loads), media_type="text/plain; version=0.0.4; charset=utf-8")
        n = len(loads)
        return json_response({
            "timestamp": datetime.now(UTC).isoformat(),
            "version": SGLANG_VERSION,
            "dp_rank_count": n,
            "loads": loads,
            "aggregate": {
                "total_running_reqs": sum(d["num_running_reqs"] for d in loads),
                "total_waiting_reqs": sum(d["num_waiting_reqs"] for d in loads),
                "total_reqs": sum(d["num_total_reqs"] for d in loads),
                "total_used_tokens": sum(d["num_used_tokens"] for d in loads),
                "total_tokens": sum(d["num_total_tokens"] for d in loads),
                "avg_token_usage": round(sum(d["token_usage"] for d in loads) / n, 4) if n else 0.0,
                "avg_throughput": round(sum(d["gen_throughput"] for d in loads) / n, 2) if n else 0.0,
                "avg_utilization": round(sum(d["utilization"] for d in loads) / n, 4) if n else 0.0,
            },
        })

    async def get_load(self, _: Request) -> Response:
        """GET /get_load: the older per-DP-rank summary."""
        load = self.emu.engine.load()
        return json_response([{
            "dp_rank": 0,
            "num_reqs": load.running + load.waiting,
            "num_waiting_reqs": load.waiting,
            "num_tokens": load.used_kv_tokens + load.pending_prefill_tokens,
        }])

    async def flush_cache(self, _: Request) -> Response:
        """GET|POST /flush_cache: empty the prefix cache; 400 while requests are in flight."""
        ok = self.emu.engine.flush_cache()
        return PlainTextResponse(
            "Cache flushed.\nPlease check backend logs for more details. "
            "(When there are running or waiting requests, the operation will not be performed.)\n",
            status_code=200 if ok else 400,
        )

    async def metrics(self, _: Request) -> Response:
        """GET /metrics: Prometheus text format."""
        return Response(self.emu.metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")


def _loads_prometheus(loads: list[dict[str, Any]]) -> str:
    samples: dict[str, list[tuple[int, float]]] = {}
    prefixes = {"speculative": "spec", "disaggregation": "disagg"}
    for load in loads:
        rank = load["dp_rank"]
        for key, value in load.items():
            if key == "dp_rank":
                continue
            if isinstance(value, dict):
                for sub, v in value.items():
                    samples.setdefault(f"sglang_{prefixes.get(key, key)}_{sub}", []).append((rank, v))
            elif isinstance(value, int | float):
                samples.setdefault(f"sglang_{key}", []).append((rank, value))
    lines: list[str] = []
    for name, values in samples.items():
        lines.append(f"# TYPE {name} gauge")
        lines.extend(f'{name}{{dp_rank="{rank}"}} {v}' for rank, v in values)
    return "\n".join(lines) + "\n"


def serve(config: EmulatorConfig, log_level: str = "info") -> None:
    """Run the emulator with uvicorn until interrupted; /health answers 503 until it has warmed up."""
    asyncio.run(_serve(config, log_level))


async def _serve(config: EmulatorConfig, log_level: str) -> None:
    emulator = Emulator(config)
    emulator.ready = False
    server = uvicorn.Server(uvicorn.Config(create_app(emulator), host=config.host, port=config.port,
                                           log_level=log_level, timeout_keep_alive=5, access_log=False))
    warm_up = asyncio.create_task(_warm_up(server, emulator))
    try:
        await server.serve()
    finally:
        warm_up.cancel()


async def _warm_up(server: uvicorn.Server, emulator: Emulator) -> None:
    """Like SGLang's start-up warmup: send generate requests through the whole HTTP stack, so that the
    first client request does not pay for lazy imports and first-use costs."""
    while not server.started:
        await asyncio.sleep(0.01)
    host = "127.0.0.1" if emulator.config.host in ("0.0.0.0", "") else emulator.config.host
    body = {"text": WARMUP_TEXT, "sampling_params": {"max_new_tokens": 8, "temperature": 0}, "log_metrics": False}
    key = emulator.config.api_key
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=f"http://{host}:{emulator.config.port}", timeout=60,
                                 headers=headers) as client:
        for stream in (True, False):
            response = await client.post("/generate", json={**body, "stream": stream})
            response.raise_for_status()
    # What exists now lives as long as the server: keep it out of every later collection (SGLang's
    # /freeze_gc), and collect the young generation less often, so that collector pauses
    # do not stall the runner.
    gc.freeze()
    gc.set_threshold(GC_GEN0_THRESHOLD, *gc.get_threshold()[1:])
    emulator.ready = True
    logger.info("emulator warmed up: %s on %s", emulator.engine.model_name, emulator.engine.gpu_type)
