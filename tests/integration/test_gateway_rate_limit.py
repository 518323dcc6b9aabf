"""The API-key rate limit on the real Redis: one token bucket per key, shared by every gateway."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from gateway.auth import RateLimiter
from gateway.errors import ApiError
from lodestar.names import RedisKeys
from lodestar.redis_io import make_redis
from lodestar.settings import Settings

SETTINGS = Settings()

pytestmark = pytest.mark.integration


async def test_two_gateways_draw_from_one_bucket_per_key(redis_url: str, redis_prefix: str,
                                                         redis_client: aioredis.Redis) -> None:
    keys = RedisKeys(redis_prefix)
    clients = [make_redis(SETTINGS) for _ in range(2)]
    try:
        gateways = [RateLimiter(c, keys, rate_per_s=4.0, burst=3) for c in clients]
        for i in range(3):  # the burst, spread over both gateways
            await gateways[i % 2].take("key-a")
        with pytest.raises(ApiError) as refused:
            await gateways[1].take("key-a")
        assert refused.value.status == 429 and 0 < refused.value.retry_after_s <= 0.25
        await gateways[0].take("key-b")  # another key has its own bucket
        await asyncio.sleep(0.3)  # one token back at 4/s
        await gateways[1].take("key-a")
        with pytest.raises(ApiError):
            await gateways[0].take("key-a")
        ttl_ms = await redis_client.pttl(keys.rate_limit("key-a"))
        assert 0 < ttl_ms <= 3 / 4 * 1000 + 1000  # an idle bucket expires once it would be full again
    finally:
        for c in clients:
            await c.aclose()


async def test_zero_rate_turns_the_limit_off(redis_url: str, redis_prefix: str) -> None:
    client = make_redis(SETTINGS)
    try:
        limiter = RateLimiter(client, RedisKeys(redis_prefix), rate_per_s=0.0, burst=1)
        for _ in range(5):
            await limiter.take("k")
    finally:
        await client.aclose()
