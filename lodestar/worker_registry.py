"""The worker registry in Redis: each worker's state hash with a TTL that heartbeats renew.

Listing the live workers is two round trips whatever their number: SMEMBERS of the id set, then one script
that returns every worker's hash (a pipeline of one HGETALL per worker cost the client a command packed and
a reply parsed per worker: most of a dispatcher's registry read at 256 workers, docs/performance.md).
"""

from __future__ import annotations

import redis.asyncio as aioredis
from pydantic import ValidationError

from lodestar.names import RedisKeys
from lodestar.schemas import WorkerState

# KEYS: the workers' state hashes. Returns each one's HGETALL (a flat field, value list; empty if expired).
_READ_ALL = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""


class WorkerRegistry:
    """Register, heartbeat, drain, deregister and list live workers."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, state_ttl_s: float):
        self._r = client
        self._keys = keys
        self._ttl_ms = int(state_ttl_s * 1000)
        self._read_all = client.register_script(_READ_ALL)

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
        hashes = await self._read_all(keys=[self._keys.worker_state(wid) for wid in ids])
        live: list[WorkerState] = []
        expired: list[str] = []
        for wid, flat in zip(ids, hashes, strict=True):
            if not flat:
                expired.append(wid)
                continue
            try:
                live.append(WorkerState.from_redis(dict(zip(flat[::2], flat[1::2], strict=True))))
            except ValidationError:
                expired.append(wid)  # an unreadable entry is not a routable worker
        if expired:
            await self._r.srem(self._keys.workers, *expired)
        return live
