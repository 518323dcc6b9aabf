"""Request-id dedupe in Redis, so a redelivered request is generated once and answered once.

Kafka delivers at least once: a worker that dies before committing gets its records again, a
dispatcher that dies before committing routes a request twice (possibly to two workers), and a
dispatcher may take over a dead worker's backlog and re-route it. Two keys per request id decide
who serves it:

- `dedupe:<rid>` holds the owner token `<worker_id>/<instance>` of the worker serving the request,
  with a lease (PX) that the owner renews with its heartbeat; it becomes `done <origin> <digest>` (TTL
  dedupe_ttl_s) once the result and the telemetry are acknowledged by the broker: the request's record
  on the requests topic (RoutedRequest.origin, the same for every delivery of that record) and a digest
  of what it asks (`request_digest`).
- `result:<rid>` holds the finished outcome (InferenceResult + TelemetryEvent + a digest of the
  request's content, JSON) and is written *before* publishing, so whoever finishes an interrupted
  request can publish it without generating, and a later use of the id can be answered. What is stored
  is bounded: a result text longer than `worker.max_stored_text_bytes` is not stored (`text_kept`
  false, its size in `text_bytes`), so one result costs Redis at most that plus ~2 KB.

A worker handling a record:
  1. claims the id (one Lua script: SET NX PX, or read who holds it; it returns the stored outcome):
     - `done` from the same origin: a redelivery of a request already answered; nothing is generated or
       published, the record is committed past (answered once);
     - `done` from another origin: the request id is used again, by a new record. With the same digest
       (a client retrying with its idempotency key) nothing is generated: the stored result is published
       again, marked `replayed`, to this request's reply topic, or, if it is not stored (too long, or
       evicted), an `error` result saying so. With another digest (another request reusing the id) the
       answer is an `error` result and the record goes to the DLQ;
     - held by another owner whose lease is live: wait until it is `done` (then as above) or
       its lease lapses (its owner died: claim it and carry on);
     - claimed: if `result:<rid>` holds this request's outcome with its text, a predecessor finished but
       may not have published: publish that stored outcome; if it holds another request's (another
       digest), answer and dead-letter as above; otherwise generate.
  2. writes `result:<rid>`; 3. publishes result and telemetry and awaits both acks;
  4. sets `dedupe:<rid>` to `done`; 5. marks the offset complete (committed in order, later).
Steps 2 and 4 are useful, not essential: when Redis is out of memory they are skipped (logged and
counted) and the request is still answered.

Crash windows: dying before 2 loses only the generation (the lease lapses, the request is generated
again, once). Dying between 3 and 4 lets the next owner publish the stored outcome a second time;
clients therefore also dedupe results by request id, and nothing is ever generated twice after
step 2 (unless its text was too long to store). A lease that lapses while its owner is alive but cut off
from Redis for longer than state_ttl_s may lead to a second generation; the client still returns one
result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aioredis
import xxhash
from pydantic import BaseModel, ConfigDict, ValidationError

from lodestar.names import RedisKeys
from lodestar.schemas import InferenceRequest, InferenceResult, TelemetryEvent

DONE = "done"

_CLAIM = """
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {'claimed', redis.call('GET', KEYS[2]) or '', ''}
end
if cur == ARGV[1] then
  return {'claimed', redis.call('GET', KEYS[2]) or '', ''}
end
if string.sub(cur, 1, 4) == 'done' then
  return {'done', redis.call('GET', KEYS[2]) or '', cur}
end
return {'held', '', cur}
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


# The fields that make two requests the same request (not when or where it is answered).
_CONTENT_FIELDS = {"prompt", "input_ids", "sampling", "session_id", "priority", "metadata"}


def request_digest(request: InferenceRequest) -> str:
    """A digest of what the request asks (its content, not its timing or reply topic): equal for a retry
    of the same request, different for another request reusing its id."""
    return xxhash.xxh3_128_hexdigest(request.model_dump_json(include=_CONTENT_FIELDS).encode())


class CompletedRequest(BaseModel):
    """A finished request's outcome as stored in `result:<rid>`: what to publish, and to where.
    `telemetry` is None for an answer that served nothing (a replay, a conflict)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    reply_topic: str
    result: InferenceResult
    telemetry: TelemetryEvent | None
    request_digest: str = ""  # empty: stored by a version that kept none (then it is not compared)
    text_kept: bool = True  # False: the text was too long to store (`text_bytes` long)
    text_bytes: int = 0


@dataclass(frozen=True)
class Claim:
    """The outcome of claiming a request id; for a `done` one, the origin and digest it was done with (empty
    when a version that recorded none marked it)."""

    state: Literal["claimed", "done", "held"]
    holder: str = ""
    stored: CompletedRequest | None = None
    origin: str = ""
    digest: str = ""

    def is_redelivery(self, origin: str, digest: str) -> bool:
        """Whether a record of `origin` and `digest` is one more delivery of the request this id was done for
        (not a new use of the id): the same origin, or, an origin being unknown, the same content."""
        if self.origin and origin:
            return self.origin == origin
        done_digest = self.digest or (self.stored.request_digest if self.stored is not None else "")
        return not done_digest or done_digest == digest

    def same_request(self, digest: str) -> bool:
        """Whether the request this id was done (or stored) for asks what `digest` says (unknown: yes)."""
        done_digest = self.digest or (self.stored.request_digest if self.stored is not None else "")
        return not done_digest or done_digest == digest


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RequestLedger:
    """Claims, leases and completion markers of request ids, for one worker instance."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, owner: str, lease_s: float, done_ttl_s: int,
                 max_stored_text_bytes: int):
        self._r = client
        self._keys = keys
        self.owner = owner
        self._lease_ms = max(int(lease_s * 1000), 1)
        self._done_ttl_s = done_ttl_s
        self._max_text_bytes = max_stored_text_bytes
        self._claim = client.register_script(_CLAIM)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def claim(self, request_id: str) -> Claim:
        """Take the request id unless it is done or leased by another live owner."""
        keys = [self._keys.dedupe(request_id), self._keys.result(request_id)]
        state, extra, marker = (_text(v) for v in await self._claim(keys=keys, args=[self.owner, self._lease_ms]))
        if state == "held":
            return Claim("held", holder=marker)
        stored = None
        if extra:
            try:
                stored = CompletedRequest.model_validate_json(extra)
            except ValidationError:
                stored = None  # unreadable: generate again (or say it is gone) rather than publish garbage
        if state == "claimed":
            return Claim("claimed", stored=stored)
        _, origin, digest = (marker.split(" ") + ["", ""])[:3]
        return Claim("done", stored=stored, origin=origin.strip("-"), digest=digest.strip("-"))

    async def renew(self, request_ids: list[str]) -> int:
        """Extend this owner's leases on these ids; returns how many are still ours."""
        if not request_ids:
            return 0
        keys = [self._keys.dedupe(rid) for rid in request_ids]
        return int(await self._renew(keys=keys, args=[self.owner, self._lease_ms]))

    async def store(self, completed: CompletedRequest) -> None:
        """Write the outcome before publishing it (so a successor can publish it without generating), its
        text only if it is at most `max_stored_text_bytes` long."""
        rid = completed.result.request_id
        size = len(completed.result.text.encode())
        if size > self._max_text_bytes:
            completed = completed.model_copy(update={
                "result": completed.result.model_copy(update={"text": ""}), "text_kept": False, "text_bytes": size})
        else:
            completed = completed.model_copy(update={"text_bytes": size})
        await self._r.set(self._keys.result(rid), completed.model_dump_json(), ex=self._done_ttl_s)

    async def mark_done(self, request_id: str, origin: str, digest: str) -> None:
        """The result and telemetry were acknowledged: later deliveries of the same origin are skipped, later
        uses of the id answered from what is stored."""
        await self._r.set(self._keys.dedupe(request_id), f"{DONE} {origin or '-'} {digest or '-'}",
                          ex=self._done_ttl_s)

    async def release(self, request_id: str) -> None:
        """Give up an unfinished claim now (on a hard stop), instead of letting its lease lapse."""
        await self._release(keys=[self._keys.dedupe(request_id)], args=[self.owner])
