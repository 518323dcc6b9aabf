"""The worker registry in Redis: each worker's state hash with a TTL that heartbeats renew.

Listing the live workers is two round trips whatever their number: SMEMBERS of the id set, then one script
that returns every worker's hash (a pipeline of one HGETALL per worker cost the client a command packed and
a reply parsed per worker: most of a dispatcher's registry read at 256 workers, docs/performance.md). The
script runs as a read-only one (EVALSHA_RO, Redis 7), so a user with read-only access to the registry (the
gateway's ACL in docs/security.md) may run it.
"""

from __future__ import annotations

import hashlib

import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import NoScriptError

from lodestar.names import RedisKeys
from lodestar.schemas import WorkerState

# KEYS: the workers' state hashes. Returns each one's HGETALL (a flat field, value list; empty if expired).
_READ_ALL = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""
_READ_ALL_SHA = hashlib.sha1(_READ_ALL.encode()).hexdigest()


class WorkerRegistry:
    """Register, heartbeat, drain, deregister and list live workers."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, state_ttl_s: float):
        self._r = client
        self._keys = keys
        self._ttl_ms = int(state_ttl_s * 1000)
        self._parsed: dict[str, tuple[list[bytes], WorkerState]] = {}  # id -> (hash as last listed, its state)

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
        """Workers whose heartbeat has not expired, sorted by id; expired ids are pruned.

        A worker whose hash is unchanged since this registry's previous listing is not parsed again: the
        same WorkerState comes back (read-only to callers). A dispatcher lists every `registry_staleness_s`
        (0.25 s), several times per heartbeat (`worker.heartbeat_s`)."""
        members = await self._r.smembers(self._keys.workers)
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not ids:
            self._parsed = {}
            return []
        hashes = await self._read_all([self._keys.worker_state(wid) for wid in ids])
        live: list[WorkerState] = []
        expired: list[str] = []
        parsed: dict[str, tuple[list[bytes], WorkerState]] = {}
        for wid, flat in zip(ids, hashes, strict=True):
            if not flat:
                expired.append(wid)
                continue
            known = self._parsed.get(wid)
            if known is not None and known[0] == flat:
                state = known[1]
            else:
                try:
                    state = WorkerState.from_redis(dict(zip(flat[::2], flat[1::2], strict=True)))
                except ValidationError:
                    expired.append(wid)  # an unreadable entry is not a routable worker
                    continue
            parsed[wid] = (flat, state)
            live.append(state)
        self._parsed = parsed
        if expired:
            await self._r.srem(self._keys.workers, *expired)
        return live

    async def _read_all(self, keys: list[str]) -> list[list[bytes]]:
        """Every key's HGETALL, by the cached script (loaded by EVAL_RO when the server does not know it)."""
        try:
            return await self._r.evalsha_ro(_READ_ALL_SHA, len(keys), *keys)
        except NoScriptError:
            return await self._r.eval_ro(_READ_ALL, len(keys), *keys)
