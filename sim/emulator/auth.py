"""SGLang's `--api-key` for the emulator: the API wants `Authorization: Bearer <key>`.

As SGLang 0.5.x's middleware (python/sglang/srt/utils/auth.py, its NORMAL level; the emulator has no
admin-only routes): with a key configured, every request needs it, compared in constant time, except
OPTIONS requests and paths starting with /health or /metrics (probes and Prometheus scrape without
secrets); a missing or wrong key gets 401 `{"error": "Unauthorized"}`.
"""

from __future__ import annotations

import json
import secrets

from starlette.types import ASGIApp, Receive, Scope, Send

OPEN_PREFIXES = ("/health", "/metrics")
UNAUTHORIZED = json.dumps({"error": "Unauthorized"}).encode()


def authorized(method: str, path: str, authorization: str | None, api_key: str) -> bool:
    """Whether a request may pass, SGLang's way."""
    if method == "OPTIONS" or path.startswith(OPEN_PREFIXES):
        return True
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(token.encode(), api_key.encode())


class ApiKeyMiddleware:
    """Pure ASGI (streaming responses and client disconnects pass through untouched)."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.api_key = api_key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = dict(scope["headers"])
            authorization = headers.get(b"authorization", b"").decode("latin-1") or None
            if not authorized(scope["method"], scope["path"], authorization, self.api_key):
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(UNAUTHORIZED)).encode())]})
                await send({"type": "http.response.body", "body": UNAUTHORIZED})
                return
        await self.app(scope, receive, send)
