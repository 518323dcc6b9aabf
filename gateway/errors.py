"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the HTTP status that fits.

Every refusal of the gateway is one: a body that does not parse or breaks a bound (400, with the offending
parameter), a missing or unknown API key (401), an unknown model or route (404), a body over the size limit
(413), a rate limit or a saturated pipeline (429, with Retry-After), a deadline (504), no worker (503), and
the pipeline's own answers: the engine refusing the input (its status and words), failing (502/503).
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from lodestar.schemas import InferenceResult

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 408: "timeout", 413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 499: "request_aborted", 504: "timeout"}


class ApiError(Exception):
    """An error answered to the client (as JSON before a stream starts, as an SSE event after)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after_s: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s

    @property
    def type(self) -> str:
        return _TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_bytes(self) -> bytes:
        return json.dumps(self.body(), separators=(",", ":"), ensure_ascii=False).encode()

    def headers(self) -> dict[str, str]:
        if self.retry_after_s is None:
            return {}
        return {"Retry-After": str(max(1, round(self.retry_after_s + 0.5)))}


def invalid(exc: ValidationError, what: str) -> ApiError:
    """A 400 naming the first parameter the body got wrong (pydantic's location and message)."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or None
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unsupported parameter {loc!r} (this gateway serves text generation only)"
    elif first["type"] == "missing":
        message = f"{loc!r} is required"
    elif loc:
        message = f"{loc}: {message}"
    return ApiError(400, f"invalid {what}: {message}", param=loc, code="invalid_value")


def from_result(result: InferenceResult) -> ApiError:
    """The error of a request the pipeline did not serve."""
    message = result.error or f"the request ended with status {result.status}"
    if result.status == "rejected" and not result.worker_id:
        return ApiError(503, f"no worker could take the request: {message}", code="no_worker", retry_after_s=5)
    if result.error_status is not None:
        code = {400: "invalid_request", 413: "payload_too_large", 499: "aborted", 502: "engine_failed",
                503: "overloaded", 504: "timeout"}.get(result.error_status)
        return ApiError(result.error_status, message, code=code)
    if result.status == "rejected":
        return ApiError(400, message, code="invalid_request")
    return ApiError(500, message, code="internal_error")
