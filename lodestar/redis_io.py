"""Redis clients, configured one way for every service.

Every Redis client in the project is made here, so the server's address and its security (TLS with
`rediss://`, an ACL user and password; the `redis` settings section) reach every connection alike.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from lodestar.settings import RedisSettings, Settings


def connection_options(redis: RedisSettings) -> dict[str, Any]:
    """Client arguments beside the URL: the ACL login and, for rediss://, the TLS files and checks."""
    options: dict[str, Any] = {}
    if redis.username:
        options["username"] = redis.username
    if redis.password.get_secret_value():
        options["password"] = redis.password.get_secret_value()
    if redis.uses_tls:
        options.update(ssl_cert_reqs="required", ssl_check_hostname=redis.ssl_check_hostname)
        for option, path in (("ssl_ca_certs", redis.ssl_cafile), ("ssl_certfile", redis.ssl_certfile),
                             ("ssl_keyfile", redis.ssl_keyfile)):
            if path is not None:
                options[option] = str(path)
    return options


def make_redis(settings: Settings | RedisSettings, *, decode_responses: bool = False, pool_size: int | None = None,
               **options: Any) -> aioredis.Redis:
    """A client of the settings' Redis (or of a `redis` section on its own). With `pool_size`, callers beyond that
    many connections queue for one (a blocking pool) instead of failing; close it with
    `aclose(close_connection_pool=True)`. `options` are further redis-py client arguments (timeouts, ...)."""
    redis = settings.redis if isinstance(settings, Settings) else settings
    kwargs = {**connection_options(redis), "decode_responses": decode_responses, **options}
    if pool_size is None:
        return aioredis.from_url(redis.url, **kwargs)
    pool = aioredis.BlockingConnectionPool.from_url(redis.url, max_connections=pool_size, timeout=None, **kwargs)
    return aioredis.Redis(connection_pool=pool)
