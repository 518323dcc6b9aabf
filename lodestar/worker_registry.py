"""The worker registry in Redis: each worker's state hash with a TTL that heartbeats renew."""

from __future__ import annotations

import redis.asyncio as aioredis
from pydantic import ValidationError

from lodestar.names import RedisKeys
from lodestar.schemas import WorkerState


class WorkerRegistry:
    """Register, heartbeat, drain, deregister and list live workers."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, state_ttl_s: float):
        self._r = client
        self._keys = keys
        self._ttl_ms = int(state_ttl_s * 1000)

    async def publish(self, state: WorkerState) -> None:
        """Write a worker's state and renew its TTL (registration and heartbeat are the same call)."""
        key = self._keys.worker_state(state.worker_id)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=state.to_redis())
            pipe.pexpire(key, self._ttl_ms)
            pipe.sadd(self._keys.workers, state.worker_id)
            await pipe.execute()

    async def deregister(self, worker_id: str) -> None:
        """Remove a worker now (on clean shutdown)."""
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.delete(self._keys.worker_state(worker_id))
            pipe.srem(self._keys.workers, worker_id)
            await pipe.execute()

    async def live_workers(self) -> list[WorkerState]:
        """Workers whose heartbeat has not expired, sorted by id; expired ids are pruned."""
        members = await self._r.smembers(self._keys.workers)
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not ids:
            return []
        async with self._r.pipeline(transaction=False) as pipe:
            for wid in ids:
                pipe.hgetall(self._keys.worker_state(wid))
            hashes = await pipe.execute()
        live: list[WorkerState] = []
        expired: list[str] = []
        for wid, mapping in zip(ids, hashes, strict=True):
            if not mapping:
                expired.append(wid)
                continue
            try:
                live.append(WorkerState.from_redis(mapping))
            except ValidationError:
                expired.append(wid)  # an unreadable entry is not a routable worker
        if expired:
            await self._r.srem(self._keys.workers, *expired)
        return live
