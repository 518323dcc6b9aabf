"""Request-id dedupe in Redis, so a redelivered request is generated once and answered once.

Kafka delivers at least once: a worker that dies before committing gets its records again, a
dispatcher that dies before committing routes a request twice (possibly to two workers), and a
dispatcher may take over a dead worker's backlog and re-route it. Two keys per request id decide
who serves it:

- `dedupe:<rid>` holds the owner token `<worker_id>/<instance>` of the worker serving the request,
  with a lease (PX) that the owner renews with its heartbeat; it becomes `done` (TTL dedupe_ttl_s)
  once the result and the telemetry are acknowledged by the broker.
- `result:<rid>` holds the finished outcome (InferenceResult + TelemetryEvent, JSON) and is written
  *before* publishing, so whoever finishes an interrupted request can publish it without generating.
- `abort:<rid>` (written by a front door whose client went away) makes the claim report the request as
  aborted, so it is answered without being generated; the owner also looks for it on each heartbeat
  (`aborted`) and stops a generation under way.

A worker handling a record:
  1. claims the id (one Lua script: SET NX PX, or read who holds it):
     - `done`: already answered; nothing is generated or published, the record is committed past;
     - held by another owner whose lease is live: wait until it is `done` (then commit past) or
       its lease lapses (its owner died: claim it and carry on);
     - claimed: if `result:<rid>` exists a predecessor finished but may not have published: publish
       that stored outcome; otherwise generate.
  2. writes `result:<rid>`; 3. publishes result and telemetry and awaits both acks;
  4. sets `dedupe:<rid>` to `done`; 5. marks the offset complete (committed in order, later).

Crash windows: dying before 2 loses only the generation (the lease lapses, the request is generated
again, once). Dying between 3 and 4 lets the next owner publish the stored outcome a second time;
clients therefore also dedupe results by request id, and nothing is ever generated twice after
step 2. A lease that lapses while its owner is alive but cut off from Redis for longer than
state_ttl_s may lead to a second generation; the client still returns one result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
from pydantic import BaseModel, ConfigDict, ValidationError

from lodestar.names import RedisKeys
from lodestar.schemas import InferenceResult, TelemetryEvent

DONE = "done"

_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if not cur or cur == ARGV[1] then
  if not cur then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  end
  return {'claimed', redis.call('GET', KEYS[2]) or '', redis.call('EXISTS', KEYS[3])}
end
if cur == 'done' then
  return {'done', ''}
end
return {'held', cur}
"""

_RENEW = """
local n = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    n = n + 1
  end
end
return n
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class CompletedRequest(BaseModel):
    """A finished request's outcome as stored in `result:<rid>`: what to publish, and to where."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reply_topic: str
    result: InferenceResult
    telemetry: TelemetryEvent


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a request id."""

    state: Literal["claimed", "done", "held"]
    holder: str = ""
    stored: CompletedRequest | None = None
    aborted: bool = False  # claimed, but its client has already asked to abort it (`abort:<rid>`)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RequestLedger:
    """Claims, leases and completion markers of request ids, for one worker instance."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, owner: str, lease_s: float, done_ttl_s: int):
        self._r = client
        self._keys = keys
        self.owner = owner
        self._lease_ms = max(int(lease_s * 1000), 1)
        self._done_ttl_s = done_ttl_s
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def claim(self, request_id: str) -> Claim:
        """Take the request id unless it is done or leased by another live owner."""
        keys = [self._keys.dedupe(request_id), self._keys.result(request_id), self._keys.abort(request_id)]
        state, extra, *flags = await self._claim(keys=keys, args=[self.owner, self._lease_ms])
        state, extra = _text(state), _text(extra)
        if state == "held":
            return Claim("held", holder=extra)
        if state == "done":
            return Claim("done")
        stored = None
        if extra:
            try:
                stored = CompletedRequest.model_validate_json(extra)
            except ValidationError:
                stored = None  # unreadable: generate again rather than publish garbage
        return Claim("claimed", stored=stored, aborted=bool(flags and int(flags[0])))

    async def aborted(self, request_ids: list[str]) -> list[str]:
        """Which of these request ids their clients have asked to abort (one round trip)."""
        if not request_ids:
            return []
        marks = await self._r.mget([self._keys.abort(rid) for rid in request_ids])
        return [rid for rid, mark in zip(request_ids, marks, strict=True) if mark is not None]

    async def renew(self, request_ids: list[str]) -> int:
        """Extend this owner's leases on these ids; returns how many are still ours."""
        if not request_ids:
            return 0
        keys = [self._keys.dedupe(rid) for rid in request_ids]
        return int(await self._renew(keys=keys, args=[self.owner, self._lease_ms]))

    async def store(self, completed: CompletedRequest) -> None:
        """Write the outcome before publishing it (so a successor can publish it without generating)."""
        rid = completed.result.request_id
        await self._r.set(self._keys.result(rid), completed.model_dump_json(), ex=self._done_ttl_s)

    async def mark_done(self, request_id: str) -> None:
        """The result and telemetry were acknowledged: later deliveries of this id are skipped."""
        await self._r.set(self._keys.dedupe(request_id), DONE, ex=self._done_ttl_s)

    async def release(self, request_id: str) -> None:
        """Give up an unfinished claim now (on a hard stop), instead of letting its lease lapse."""
        await self._release(keys=[self._keys.dedupe(request_id)], args=[self.owner])
