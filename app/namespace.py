"""A run's namespace: every topic and Redis key under the settings' prefixes, and removing them."""

from __future__ import annotations

from lodestar.kafka_io import make_admin
from lodestar.redis_io import make_redis
from lodestar.settings import Settings


async def remove_namespace(settings: Settings) -> None:
    """Delete the topics under `kafka.topic_prefix` and the keys under `redis.key_prefix`."""
    admin = make_admin(settings)
    await admin.start()
    try:
        doomed = [t for t in await admin.list_topics() if t.startswith(settings.kafka.topic_prefix)]
        if doomed:
            await admin.delete_topics(doomed)
    finally:
        await admin.close()
    client = make_redis(settings)
    try:
        keys = [k async for k in client.scan_iter(match=f"{settings.redis.key_prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
