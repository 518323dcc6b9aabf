"""httpx on aiohttp: the transport of the HTTP clients that stream many responses at once (the worker's engine
client, the gateway bench's load generator, the demo's traffic through a gateway).

httpx's own transport (httpcore, h11, anyio) costs about twice the CPU of aiohttp's per streamed response: its
pure-Python HTTP/1.1 parser and layers run for every server-sent event, and its connection pool scans every
connection (an `is_idle` check of each against each idle one, a `poll` of each idle socket) whenever a request
starts or ends, so the cost of a request grows with the number of open connections. aiohttp parses with its C
parser (llhttp) and keeps idle connections in a per-host queue. Measured on this 2-core host, a 32-token chat
stream read from the emulator through `httpx.AsyncClient`, 300 streams at 30 req/s: 5.8-7.2 ms of CPU per
stream with httpx's transport, 3.0-3.3 ms with this one, 2.7-3.0 ms with aiohttp alone (docs/gateway.md,
"Measure"). The callers keep httpx's API (and its MockTransport in tests): only the transport changes.

Errors keep httpx's classes (httpx_aiohttp maps them): a refused or dropped connection is an `httpx.ConnectTimeout`
or `httpx.ConnectError`, a read past its timeout an `httpx.ReadTimeout`, a body cut short an `httpx.ReadError`.
Unlike httpx's own transport, this one does not read proxies from the environment (HTTP_PROXY, NO_PROXY): the
engine is the worker's neighbour, reached directly. HTTPS is verified against the system's certificates.
"""

from __future__ import annotations

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport


def aiohttp_transport(max_connections: int | None = None, keepalive_s: float = 5.0) -> httpx.AsyncBaseTransport:
    """An httpx transport on an aiohttp connection pool of at most `max_connections` (None: unbounded) that keeps an
    idle connection for `keepalive_s`. Its session is created at the first request, inside the running loop."""

    def session() -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(limit=max_connections or 0, keepalive_timeout=keepalive_s)
        return aiohttp.ClientSession(connector=connector)

    return AiohttpTransport(client=session)
