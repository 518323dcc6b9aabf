"""Fault injection for tests and `scripts/chaos.py`: make a running emulator fail like a broken SGLang server.

Off unless the emulator runs with `--fault-injection` (a real deployment's engine has no such switch). Then
`POST /fault_injection` with `{"mode": ...}` sets how the generation routes (`/generate`, `/v1/completions`,
`/v1/chat/completions`) answer from now on, and `GET /fault_injection` reads it back:

- `none`: served normally;
- `error`: answered at once with HTTP `status` (default 500) and an SGLang-style error body;
- `hang`: never answered (the connection stays open until the client gives up); with `"loads": true` the
  load endpoints (`/v1/loads`, `/get_load`, `/metrics`) hang as well, as on an engine whose scheduler is stuck.

Requests already in progress are not affected. /health keeps answering in every mode (SGLang's /health
only checks the HTTP server).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from sim.emulator.responses import error_response

GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})
LOAD_PATHS = frozenset({"/v1/loads", "/get_load", "/metrics"})
MODES = ("none", "error", "hang")
PATH = "/fault_injection"


@dataclass
class Fault:
    """The current fault: its mode, the status of `error`, whether `hang` includes the load endpoints."""

    mode: str = "none"
    status: int = 500
    loads: bool = False

    def applies_to(self, path: str) -> bool:
        if self.mode == "none":
            return False
        return path in GENERATION_PATHS or (self.mode == "hang" and self.loads and path in LOAD_PATHS)


class FaultInjector:
    """ASGI middleware answering the affected routes as the current `Fault` says."""

    def __init__(self, app: ASGIApp, fault: Fault) -> None:
        self.app = app
        self.fault = fault

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.fault.applies_to(scope["path"]):
            await self.app(scope, receive, send)
            return
        if self.fault.mode == "hang":
            await asyncio.Event().wait()  # until the client disconnects (the server cancels this)
        response = error_response(f"injected fault: HTTP {self.fault.status}", "InternalServerError",
                                  self.fault.status)
        await response(scope, receive, send)


def control_route(fault: Fault) -> Route:
    """`GET|POST /fault_injection`: read or set `fault`."""

    async def handle(request: Request) -> Response:
        if request.method == "POST":
            try:
                body = await request.json()
                mode = body["mode"]
                status = int(body.get("status", 500))
                loads = bool(body.get("loads", False))
            except (ValueError, KeyError, TypeError) as exc:
                return JSONResponse({"error": f"bad fault: {exc!r}"}, status_code=400)
            if mode not in MODES or not 400 <= status <= 599:
                return JSONResponse({"error": f"mode must be one of {MODES}, status 400-599"}, status_code=400)
            fault.mode, fault.status, fault.loads = mode, status, loads
        return JSONResponse({"mode": fault.mode, "status": fault.status, "loads": fault.loads})

    return Route(PATH, handle, methods=["GET", "POST"])
