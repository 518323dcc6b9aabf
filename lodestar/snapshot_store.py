"""The current model snapshot in Redis: the learner writes and announces it, dispatchers read it.

One hash (`RedisKeys.snapshot`) holds `version` and `payload` (the signed envelope of lodestar.snapshot);
the write and the announcement on `RedisKeys.snapshot_channel` happen in one Lua script, which also
refuses a version that is not newer than the stored one, so a stale learner cannot roll the model back.
Readers verify the signature on every load, under the accepted key the envelope names; a payload that
fails is reported, never used. The keys come from lodestar.snapshot_keys (checked for strength there).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from lodestar import snapshot as codec
from lodestar.names import RedisKeys
from lodestar.snapshot import SigningKey, Snapshot, SnapshotError

log = logging.getLogger(__name__)

_PUBLISH_IF_NEWER = """
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '-1')
local version = tonumber(ARGV[1])
if version <= current then
  return current
end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'payload', ARGV[2])
redis.call('PUBLISH', KEYS[2], ARGV[1])
return -1
"""


class StaleSnapshotVersion(RuntimeError):
    """The store already holds a version at least as new as the one offered."""

    def __init__(self, offered: int, stored: int):
        super().__init__(f"snapshot version {offered} is not newer than the stored version {stored}")
        self.offered = offered
        self.stored = stored


class SnapshotStore:
    """Read, write and watch the model snapshot in Redis."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, *, signing_key: SigningKey | None = None,
                 verification_keys: Mapping[str, bytes] | None = None):
        """`signing_key` to publish (the learner), `verification_keys` (key id -> key) to load and watch."""
        self._r = client
        self._keys = keys
        self._signing_key = signing_key
        self._verification_keys = dict(verification_keys or {})
        self._publish_script = client.register_script(_PUBLISH_IF_NEWER)

    async def publish(self, snapshot: Snapshot) -> None:
        """Sign, store and announce `snapshot`; raises StaleSnapshotVersion if it is not newer."""
        if self._signing_key is None:
            raise RuntimeError("this SnapshotStore has no signing key: it cannot publish")
        payload = codec.encode(snapshot, self._signing_key)
        stored = await self._publish_script(
            keys=[self._keys.snapshot, self._keys.snapshot_channel], args=[snapshot.version, payload]
        )
        if int(stored) != -1:
            raise StaleSnapshotVersion(snapshot.version, int(stored))

    async def stored_version(self) -> int | None:
        """The version currently stored, without reading or verifying the payload."""
        raw = await self._r.hget(self._keys.snapshot, "version")
        return None if raw is None else int(raw)

    async def load(self) -> Snapshot | None:
        """The stored snapshot, verified; None if there is none. Raises SnapshotError if it fails checks."""
        payload = await self._r.hget(self._keys.snapshot, "payload")
        if payload is None:
            return None
        return codec.decode(payload, self._verification_keys)

    async def watch(
        self,
        on_snapshot: Callable[[Snapshot], Awaitable[None] | None],
        *,
        retry_s: float = 1.0,
        ready: asyncio.Event | None = None,
    ) -> None:
        """Deliver the stored snapshot, then each newly announced one, to `on_snapshot`, until cancelled.

        Loads once after every (re)subscription, so an announcement missed while disconnected is not
        lost. A snapshot failing verification is logged and skipped (the caller keeps its current one).
        `ready` is set once the first subscription is in place.
        """
        while True:
            pubsub = self._r.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._keys.snapshot_channel)
                await self._deliver(on_snapshot)
                if ready is not None:
                    ready.set()
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self._deliver(on_snapshot)
            except (RedisConnectionError, OSError) as exc:
                log.warning("snapshot channel lost (%s); resubscribing in %.1fs", exc, retry_s)
                await asyncio.sleep(retry_s)
            finally:
                await pubsub.aclose()

    async def _deliver(self, on_snapshot: Callable[[Snapshot], Awaitable[None] | None]) -> None:
        try:
            snap = await self.load()
        except SnapshotError as exc:
            log.error("ignoring the stored model snapshot: %s", exc)
            return
        if snap is None:
            return
        result = on_snapshot(snap)
        if result is not None:
            await result
