"""Dead-worker takeover: re-route the backlog of a worker whose heartbeat has been gone too long.

Every dispatcher records the last heartbeat of each live worker it sees (`RedisKeys.workers_seen`,
a sorted set scored by the worker's `updated_at`, ms). A worker missing from the registry whose last
heartbeat is older than `dispatcher.dead_worker_timeout_s` is dead. One dispatcher (the one that takes
`RedisKeys.takeover_lock`) joins the worker's own consumer group on its topic, so it continues exactly
from the worker's committed offset, re-routes every uncommitted RoutedRequest to live workers
(`decision.attempt + 1`), commits, leaves the group, drops the worker's prefix index and forgets it.

If the worker comes back before the timeout, it is live again and simply serves its backlog. If it
comes back during a takeover, it joins its group, the partition moves to it, and the takeover stops at
its last commit; a request re-routed but not yet committed may then reach two workers, which is what
the workers' request-id dedupe is for.

A routed message that cannot be read, or whose request cannot be re-routed for a reason of its own, is
dead-lettered (stage `takeover`) and the takeover moves past it.

Each re-routed request gets a `route` span that continues the request's trace: its parent is the
context the original routing put in the routed message's headers (a new trace when there is none).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from opentelemetry.trace import Span

from dispatcher.routing import BatchPlan
from dispatcher.worker_view import WorkerView
from lodestar import tracing
from lodestar.faults import describe, is_transient
from lodestar.kafka_io import dead_letter_for, make_consumer
from lodestar.names import RedisKeys, Topics
from lodestar.schemas import DeadLetter, InferenceRequest, InvalidMessage, RoutedRequest, decode, now_ms
from lodestar.settings import Settings

log = logging.getLogger(__name__)

LOCK_TTL_MS = 60_000
JOIN_TIMEOUT_S = 20.0
POLL_MS = 200

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
_FORGET_IF_SILENT = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if score and tonumber(score) <= tonumber(ARGV[2]) then return redis.call('ZREM', KEYS[1], ARGV[1]) end
return 0
"""

# (requests, their route spans (ended by the callee), delivery attempts, origins) -> the plan: routed and
# acknowledged, and the requests that failed on their own
Reroute = Callable[[Sequence[InferenceRequest], Sequence[Span], Sequence[int], Sequence[str]], Awaitable[BatchPlan]]


class TakeoverAborted(RuntimeError):
    """The takeover stopped early (worker back, partition moved, nowhere to route, lock lost)."""


class DeadWorkerTakeover:
    """Finds dead workers with a backlog and re-routes it through the dispatcher's routing path."""

    def __init__(
        self,
        settings: Settings,
        client: aioredis.Redis,
        view: WorkerView,
        *,
        reroute: Reroute,
        remove_prefixes: Callable[[str], Awaitable[None]],
        dead_letter: Callable[[DeadLetter], Awaitable[None]],
        dispatcher_id: str,
    ):
        self.settings = settings
        self.timeout_s = settings.dispatcher.dead_worker_timeout_s
        self.check_every_s = max(0.2, min(5.0, self.timeout_s / 3))
        self._r = client
        self._keys = RedisKeys(settings.redis.key_prefix)
        self._topics = Topics(settings.kafka.topic_prefix)
        self._view = view
        self._reroute = reroute
        self._remove_prefixes = remove_prefixes
        self._dead_letter = dead_letter
        self._dispatcher_id = dispatcher_id
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._forget = client.register_script(_FORGET_IF_SILENT)
        self._tracer = tracing.get_tracer("dispatcher")
        self.rerouted = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Check for dead workers every `check_every_s` until `stop` is set."""
        while not stop.is_set():
            try:
                await self.check_once()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                log.warning("dead-worker check failed, retrying: %s", describe(exc, 300))
            try:
                await asyncio.wait_for(stop.wait(), self.check_every_s)
            except TimeoutError:
                continue

    async def check_once(self) -> dict[str, int]:
        """Record live workers' heartbeats, take over every dead one; returns worker -> re-routed count."""
        await self._view.refresh()
        live = {w.worker_id: w.updated_at for w in self._view.live}
        if live:
            await self._r.zadd(self._keys.workers_seen, live, gt=True)
        cutoff = now_ms() - self.timeout_s * 1000.0
        silent = await self._r.zrangebyscore(self._keys.workers_seen, "-inf", cutoff)
        done: dict[str, int] = {}
        for raw in silent:
            worker_id = raw.decode() if isinstance(raw, bytes) else raw
            if worker_id in live:
                continue
            if not self._view.routable:
                log.warning("worker %s is dead but no worker is routable: its backlog waits", worker_id)
                break
            count = await self.take_over(worker_id, cutoff)
            if count is not None:
                done[worker_id] = count
        return done

    async def take_over(self, worker_id: str, cutoff_ms: float) -> int | None:
        """Re-route `worker_id`'s uncommitted backlog under the takeover lock; None if not done here."""
        lock = self._keys.takeover_lock(worker_id)
        token = uuid.uuid4().hex
        if not await self._r.set(lock, token, nx=True, px=LOCK_TTL_MS):
            return None  # another dispatcher is on it
        try:
            count = await self._drain(worker_id, lock, token)
        except TakeoverAborted as exc:
            log.warning("takeover of worker %s stopped: %s", worker_id, exc)
            return None
        finally:
            await self._release(keys=[lock], args=[token])
        await self._remove_prefixes(worker_id)
        await self._forget(keys=[self._keys.workers_seen], args=[worker_id, cutoff_ms])
        if count:
            log.warning("worker %s dead for over %.0f s: re-routed its %d uncommitted requests",
                        worker_id, self.timeout_s, count)
        else:
            log.info("worker %s dead for over %.0f s with no backlog: forgotten", worker_id, self.timeout_s)
        return count

    async def _drain(self, worker_id: str, lock: str, token: str) -> int:
        batch_size = self.settings.dispatcher.batch_size
        group = self._topics.worker_group(worker_id)
        consumer = make_consumer(
            self.settings,
            self._topics.worker(worker_id),
            group_id=group,
            client_id=f"dispatcher-{self._dispatcher_id}-takeover",
            max_poll_records=batch_size,
        )
        await consumer.start()
        try:
            ends: dict[TopicPartition, int] = {}
            joined_by = time.monotonic() + JOIN_TIMEOUT_S
            total = 0
            while True:
                batch = await consumer.getmany(timeout_ms=POLL_MS, max_records=batch_size)
                records = [r for recs in batch.values() for r in recs]
                if records:
                    total += await self._reroute_records(consumer, records, group)
                    if not await self._renew(keys=[lock], args=[token, LOCK_TTL_MS]):
                        raise TakeoverAborted("lost the takeover lock")
                assigned = consumer.assignment()
                if not assigned:
                    if ends:
                        raise TakeoverAborted("the worker's partition moved away (worker back?)")
                    if time.monotonic() > joined_by:
                        raise TakeoverAborted(f"no partition assigned within {JOIN_TIMEOUT_S:.0f} s")
                    continue
                missing = [tp for tp in assigned if tp not in ends]
                if missing:
                    ends.update(await consumer.end_offsets(missing))
                if all([await consumer.position(tp) >= ends[tp] for tp in assigned]):
                    return total
        finally:
            await consumer.stop()

    async def _reroute_records(self, consumer: AIOKafkaConsumer, records: list[ConsumerRecord], group: str) -> int:
        requests: list[InferenceRequest] = []
        attempts: list[int] = []
        origins: list[str] = []
        readable: list[ConsumerRecord] = []
        for record in records:
            try:
                if record.value is None:
                    raise InvalidMessage("empty message (no value)")
                routed = decode(RoutedRequest, record.value)
            except Exception as exc:  # an unreadable message is its own fault
                await self._dead_letter(dead_letter_for(record, stage="takeover", service="dispatcher", failure=exc))
                continue
            requests.append(routed.request)
            attempts.append(routed.decision.attempt + 1)
            origins.append(routed.origin)
            readable.append(record)
        if requests:
            await self._view.refresh()
            if not self._view.routable:
                raise TakeoverAborted("no routable worker to take the backlog")
            spans = [
                tracing.start_process_span(self._tracer, tracing.OP_ROUTE, record, request_id=request.request_id,
                                           group=group)
                for request, record in zip(requests, readable, strict=True)
            ]
            plan = await self._reroute(requests, spans, attempts, origins)
            for failure in plan.failed:
                await self._dead_letter(dead_letter_for(readable[failure.index], stage="takeover",
                                                        service="dispatcher", failure=failure.error))
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            raise TakeoverAborted(f"commit failed ({exc}); the worker's group moved on") from exc
        self.rerouted += len(requests)
        return len(requests)
