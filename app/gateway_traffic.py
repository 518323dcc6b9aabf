"""Sending a run's requests through a gateway instead of the client library (`lodestar up --gateway`).

`GatewayTraffic.request` takes the same InferenceRequest `app.traffic.drive` hands the client library and
answers with an InferenceResult, but makes the request as an OpenAI client would: a streamed
`/v1/completions` (the token-id prompt as `prompt`, the session in `x-session-id`), timed at the client. The
result's TTFT is therefore what a user of the gateway sees (the pipeline's own delay included), the worker
comes from the answer's `x-lodestar-worker` header, the token counts from its usage, and the pipeline's
request id (`x-request-id`) ties the telemetry of the request to the phase's tally.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx

from lodestar.http_transport import aiohttp_transport
from lodestar.schemas import InferenceRequest, InferenceResult

MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # the emulator's served name for llama-3.1-8b


class GatewayTraffic:
    """Requests through one gateway, each answered as an InferenceResult (see the module doc)."""

    duplicate_results = 0  # the gateway answers each request once; copies never reach an HTTP client

    def __init__(self, base_url: str, api_key: str, model: str = MODEL):
        self._http = httpx.AsyncClient(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"},
                                       transport=aiohttp_transport())  # streams cost half the CPU (its docstring)
        self._model = model
        self.on_request_id: Callable[[str], None] = lambda _: None  # the pipeline's id of each request sent

    async def __aenter__(self) -> GatewayTraffic:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._http.aclose()

    async def request(self, request: InferenceRequest, timeout_s: float = 120.0) -> InferenceResult:
        """One streamed completion; TimeoutError after timeout_s."""
        s = request.sampling
        body: dict[str, Any] = {"model": self._model, "prompt": request.input_ids or request.prompt,
                                "max_tokens": s.max_new_tokens, "temperature": s.temperature, "top_p": s.top_p,
                                "stop": s.stop or None, "ignore_eos": s.ignore_eos, "stream": True,
                                "stream_options": {"include_usage": True}}
        headers = {"x-session-id": request.session_id} if request.session_id else {}
        sent = time.perf_counter()
        ttft_ms: float | None = None
        usage: dict[str, Any] = {}
        finish: str | None = None
        async with self._http.stream("POST", "/v1/completions", json=body, headers=headers,
                                     timeout=timeout_s) as response:
            worker = response.headers.get("x-lodestar-worker", "")
            if response.status_code != 200:
                error = json.loads(await response.aread()).get("error", {})
                return InferenceResult(request_id=request.request_id, worker_id=worker,
                                       status="rejected" if response.status_code < 500 else "error",
                                       error=str(error.get("message")), error_status=response.status_code)
            self.on_request_id(response.headers.get("x-request-id", "").removeprefix("cmpl-"))
            async for line in response.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    return InferenceResult(request_id=request.request_id, worker_id=worker, status="error",
                                           error=str(event["error"].get("message")))
                for choice in event.get("choices") or ():
                    if ttft_ms is None and choice.get("text"):
                        ttft_ms = (time.perf_counter() - sent) * 1000.0
                    finish = choice.get("finish_reason") or finish
                usage = event.get("usage") or usage
        details = usage.get("prompt_tokens_details") or {}
        return InferenceResult(
            request_id=request.request_id, worker_id=worker, status="ok", prompt_tokens=usage.get("prompt_tokens", 0),
            cached_tokens=details.get("cached_tokens") or 0, completion_tokens=usage.get("completion_tokens", 0),
            ttft_ms=ttft_ms, e2e_ms=(time.perf_counter() - sent) * 1000.0, finish_reason=finish)
