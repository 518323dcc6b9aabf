"""API keys and their rate limit.

Keys: bearer tokens (`Authorization: Bearer <key>`), checked against the SHA-256 digests in the setting
`gateway.api_key_hashes`; the keys themselves are stored nowhere. With no digest configured the gateway
refuses to start unless `gateway.allow_anonymous` says it is a development gateway, and then no key is
asked for (nor accepted: every request is the one anonymous client).

Rate limit: a token bucket per key (`gateway.rate_limit_per_s` refill, `gateway.rate_limit_burst` size), one
token per HTTP request, kept in Redis and updated by one Lua script on Redis's own clock, so that every
gateway draws from the same bucket: a client spreading its requests over N gateways behind a load balancer
gets the key's rate, not N times it. That costs one Redis round trip per request (measured in
docs/gateway.md). A key id in keys, metrics and logs is the first 12 hex digits of the key's digest.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping

import redis.asyncio as aioredis

from gateway.errors import ApiError
from lodestar.names import RedisKeys

ANONYMOUS = "anonymous"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")

_TAKE = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1])
local at = tonumber(state[2])
if tokens == nil or at == nil then
  tokens = burst
  at = now
end
tokens = math.min(burst, tokens + math.max(now - at, 0) * rate / 1000)
local allowed = 0
local wait_ms = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
else
  wait_ms = math.ceil((1 - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {allowed, wait_ms}
"""


def key_digest(key: str) -> str:
    """The SHA-256 hex digest of an API key, as `gateway.api_key_hashes` lists it."""
    return hashlib.sha256(key.encode()).hexdigest()


class ApiKeys:
    """The accepted keys' digests; `identify` turns an Authorization header into a key id or a 401."""

    def __init__(self, digests: Iterable[str], allow_anonymous: bool):
        self._digests = frozenset(d.lower() for d in digests)
        bad = [d for d in self._digests if not _DIGEST.match(d)]
        if bad:
            raise ValueError(f"gateway.api_key_hashes: {len(bad)} entries are not SHA-256 hex digests")
        if not self._digests and not allow_anonymous:
            raise ValueError("the gateway has no API key: set gateway.api_key_hashes (SHA-256 hex digests of the "
                             "keys), or gateway.allow_anonymous=true for a development gateway")
        self.anonymous = not self._digests

    def identify(self, headers: Mapping[str, str]) -> str:
        """The key id of the request's bearer token; ApiError 401 if it has none or an unknown one."""
        if self.anonymous:
            return ANONYMOUS
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
        digest = key_digest(token)
        if digest not in self._digests:
            raise ApiError(401, "invalid API key", code="invalid_api_key")
        return digest[:12]


class RateLimiter:
    """Token buckets per key id in Redis (see the module doc); `rate_per_s` 0 turns it off."""

    def __init__(self, redis: aioredis.Redis, keys: RedisKeys, rate_per_s: float, burst: int):
        self.keys = keys
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._take = redis.register_script(_TAKE)

    async def take(self, key_id: str) -> None:
        """Take one request's token; ApiError 429 (with Retry-After) if the bucket is empty."""
        if self.rate_per_s <= 0:
            return
        allowed, wait_ms = await self._take(keys=[self.keys.rate_limit(key_id)],
                                            args=[repr(self.rate_per_s), self.burst])
        if not int(allowed):
            raise ApiError(429, f"rate limit of {self.rate_per_s:g} requests/s (burst {self.burst}) reached for "
                           "this API key", code="rate_limit_exceeded", retry_after_s=int(wait_ms) / 1000.0)
