"""The dispatcher service: consume requests in batches, route them, publish to worker topics, commit.

Per batch of records from `lodestar.requests` (one consumer group shared by every dispatcher):
admit each record (its size on the raw bytes, the schema, the model's token range, an allowed reply
topic: lodestar.limits; refused -> `lodestar.dlq` with the reason), answer a request whose deadline has
passed with an `error` result instead of routing it, describe each request (prefix block hashes), one
Redis round trip for the prefix matches of the whole batch, route one request after the other
(dispatcher.routing), publish each RoutedRequest to its worker's topic, one Redis round trip for the
prefix inserts, await every publish acknowledgement, then commit the batch's offsets. A crash before
the commit re-routes the batch (at-least-once); workers dedupe by request id.

Poison isolation (lodestar.faults): a failure that is one record's own (it does not validate, cannot be
described, routed, serialized, is too large, or its publish or answer is refused for its size or topic)
dead-letters that record with the reason and the exception's type, and the batch's other records are
routed and committed. A transient failure (the broker or Redis unavailable, no routable worker any more)
holds the whole batch uncommitted, its partitions paused but polled, and retries it with backoff. An
unexpected failure of a whole batch is retried record by record, so the one record that causes it ends
in the DLQ alone and the partition moves on.

With no routable worker the batch is held, not committed, and retried with backoff for at most
`no_worker_max_wait_s`; after that each request gets a `rejected` result on its reply topic and a dead
letter, so nothing is dropped silently. Answers go only to allowed reply topics (the dispatcher never
writes where a request merely says). The model snapshot (for policies that use one) is loaded at
start and swapped when the learner announces a new version; a snapshot failing verification is
logged and the current one kept.

Observability: each valid request gets a `route` span (child of the client's `send` span, from the
record's headers) that carries the decision and whose context goes on in the RoutedRequest's headers
to the worker; `self.metrics` (lodestar.metrics.DispatcherMetrics) counts decisions, exploration,
batches, dead letters, routing latency and the snapshot in use (docs/observability.md). `self.health`
(lodestar.health) is ready once the dispatcher joined its consumer group and its model is settled: a
snapshot loaded, the fallback declared when none came within `_SNAPSHOT_WAIT_S`, or a policy without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import Enum

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from opentelemetry.trace import Span

from dispatcher.orphans import OrphanFinder
from dispatcher.policies.base import Policy, SnapshotPolicy
from dispatcher.policies.registry import check_params_by_policy, make_policy
from dispatcher.redis_prefix_index import RedisPrefixIndex
from dispatcher.redispatch import DeadWorkerTakeover
from dispatcher.routing import BatchPlan, BatchRouter, RouteFailure, describe
from dispatcher.worker_view import WorkerView
from lodestar import tracing
from lodestar.faults import Backoff, TransientFailure, is_redis_oom, is_transient
from lodestar.faults import describe as describe_failure
from lodestar.health import GroupJoined, Health
from lodestar.kafka_admin import fixed_topic_partitions
from lodestar.kafka_io import DeadLetters, make_consumer, make_producer
from lodestar.lifecycle import ServiceScope, service_lifecycle
from lodestar.limits import Limits, deadline_passed
from lodestar.metrics import DispatcherMetrics
from lodestar.names import RedisKeys, Topics
from lodestar.redis_io import make_redis
from lodestar.schemas import DeadLetter, InferenceRequest, InferenceResult, RoutedRequest, Status, now_ms
from lodestar.settings import Settings
from lodestar.snapshot import Snapshot, SnapshotError
from lodestar.snapshot_keys import verification_keys
from lodestar.snapshot_store import SnapshotStore
from lodestar.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)

SERVICE = "dispatcher"
_MAX_BACKOFF_S = 5.0
_SNAPSHOT_WAIT_S = 5.0
_STATS_EVERY_S = 30.0


def default_dispatcher_id() -> str:
    """host-pid: unique per process on a machine, readable in decisions and logs."""
    return f"{socket.gethostname()}-{os.getpid()}"


def build_policy(name: str, settings: Settings) -> Policy:
    """The named policy with its parameters from `dispatcher.policy_params`, every entry of which is
    validated first (unknown policy, unknown parameter, value out of bounds: ParamsError saying which)."""
    check_params_by_policy(settings.dispatcher.policy_params)
    return make_policy(name, settings.dispatcher.policy_params.get(name, {}))




class WaitOutcome(Enum):
    READY = "ready"
    EXPIRED = "expired"
    STOPPED = "stopped"


class NoRoutableWorker(TransientFailure):
    """No worker is routable right now (they all went away since the batch's wait): hold and retry."""


@dataclass(frozen=True, slots=True)
class _Answer:
    """A result the dispatcher itself sends to a request's reply topic (expired, or no worker)."""

    record: ConsumerRecord
    request: InferenceRequest
    result: InferenceResult
    headers: list[tuple[str, bytes]]
    kind: str  # the metric's reason


@dataclass(slots=True)
class _Outbox:
    """What a batch sends besides its routed requests: answers to clients, dead letters (with their kinds)."""

    answers: list[_Answer] = field(default_factory=list)
    letters: list[tuple[DeadLetter, str]] = field(default_factory=list)

    def answer(self, record: ConsumerRecord, request: InferenceRequest, result: InferenceResult, span: Span,
               kind: str) -> None:
        self.answers.append(_Answer(record, request, result, tracing.headers_for(span), kind))

    def dead_letter(self, letter: DeadLetter, kind: str) -> None:
        self.letters.append((letter, kind))


@dataclass(slots=True)
class DispatcherStats:
    """Running totals, for the periodic log line (the Prometheus series are in `Dispatcher.metrics`)."""

    batches: int = 0
    routed: int = 0
    dead_letters: int = 0
    rejected: int = 0
    expired: int = 0


class Dispatcher:
    """One dispatcher process. Construct inside a running event loop, then `await run(stop)`."""

    def __init__(
        self,
        settings: Settings,
        *,
        policy: str | None = None,
        dispatcher_id: str | None = None,
        metrics: DispatcherMetrics | None = None,
    ):
        self.settings = settings
        cfg = settings.dispatcher
        self.dispatcher_id = dispatcher_id or cfg.dispatcher_id or default_dispatcher_id()
        self.policy_name = policy or cfg.policy
        self.policy = build_policy(self.policy_name, settings)
        self.router = BatchRouter(self.policy, self.dispatcher_id)
        self.topics = Topics(settings.kafka.topic_prefix)
        self.keys = RedisKeys(settings.redis.key_prefix)
        self.redis = make_redis(settings)
        self.view = WorkerView(
            WorkerRegistry(self.redis, self.keys, settings.worker.state_ttl_s), cfg.registry_staleness_s
        )
        self.prefix_index = RedisPrefixIndex(self.redis, self.keys, settings.prefix.index_capacity_blocks)
        # only a dispatcher that evaluates snapshots reads them, and so holds (and needs) the keys that verify them
        self.snapshots = (SnapshotStore(self.redis, self.keys, verification_keys=verification_keys(settings))
                          if self.uses_snapshots else None)
        self.producer = make_producer(settings, client_id=f"dispatcher-{self.dispatcher_id}")
        self.health = Health("group", "model")
        self.limits = Limits(settings)
        self.dead_letters = DeadLetters(self.producer, self.topics, SERVICE, self.limits.max_message_bytes)
        self.consumer = make_consumer(
            settings,
            group_id=cfg.consumer_group,
            client_id=f"dispatcher-{self.dispatcher_id}",
            max_poll_records=cfg.batch_size,
        )
        self.consumer.subscribe([self.topics.requests], listener=GroupJoined(self.health, cfg.consumer_group))
        self.takeover = DeadWorkerTakeover(
            settings,
            self.redis,
            self.view,
            reroute=self.route_and_publish,
            remove_prefixes=self.prefix_index.remove_worker,
            dead_letter=self._takeover_dead_letter,
            dispatcher_id=self.dispatcher_id,
            find_orphans=OrphanFinder(settings, client_id=f"dispatcher-{self.dispatcher_id}-orphans").find,
        )
        self.stats = DispatcherStats()
        self.metrics = metrics if metrics is not None else DispatcherMetrics()
        self.tracer = tracing.get_tracer(SERVICE)
        self.model_version = 0
        self._capacities: dict[str, int] = {}
        self._capacities_generation = -1  # the registry read the capacities were last synced with
        self._stop = asyncio.Event()
        self._commit_task: asyncio.Task[None] | None = None
        if not self.uses_snapshots:
            self.health.set("model", True, f"policy {self.policy_name} uses no model")

    @property
    def uses_snapshots(self) -> bool:
        """Whether the policy evaluates a model snapshot (and so follows the learner's announcements)."""
        return isinstance(self.policy, SnapshotPolicy)

    def assigned_partitions(self) -> set[TopicPartition]:
        """Partitions of the requests topic this dispatcher owns right now."""
        return set(self.consumer.assignment())

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Serve until `stop` is set (or forever); always leaves the group and closes its clients."""
        if stop is not None:
            self._stop = stop
        async with service_lifecycle(self.settings, fixed_topic_partitions(self.settings), producer=self.producer,
                                     consumers=[self.consumer], closers=[self.redis.aclose]) as scope:
            try:
                if self.snapshots is not None:
                    ready = asyncio.Event()
                    scope.spawn(self.snapshots.watch(self._on_snapshot, ready=ready))
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(ready.wait(), _SNAPSHOT_WAIT_S)
                    if not self.model_version:
                        self.health.set("model", True, "no model snapshot yet: routing with the fallback "
                                                       f"{self.policy.fallback_name()}")
                scope.spawn(self.takeover.run(self._stop))
                scope.spawn(self._log_stats())
                log.info("dispatcher %s up: policy %s, group %s, topic %s", self.dispatcher_id,
                         self.policy_name, self.settings.dispatcher.consumer_group, self.topics.requests)
                await self._consume(scope)
            finally:
                await self._settle_commit()  # the last commit completes before the consumer leaves its group
        log.info("dispatcher %s stopped after routing %d requests", self.dispatcher_id, self.stats.routed)

    async def _consume(self, scope: ServiceScope) -> None:
        cfg = self.settings.dispatcher
        while not self._stop.is_set():
            scope.check_background()  # a helper died: fail loudly rather than route without it
            batch = await self.consumer.getmany(timeout_ms=max(cfg.batch_timeout_ms, 1), max_records=cfg.batch_size)
            records = [r for recs in batch.values() for r in recs]
            if records:
                await self.process(records)

    async def process(self, records: list[ConsumerRecord]) -> None:
        """Handle a batch until it is committed, whatever fails (see the module doc): a transient failure
        holds it with backoff and tries again; an unexpected failure of the whole batch handles its records
        one by one, and a record that fails even alone is dead-lettered (stage `dispatch`)."""
        handler: Callable[[list[ConsumerRecord]], Awaitable[None]] = self.handle_batch
        delays = Backoff(self.settings.dispatcher.no_worker_backoff_s, _MAX_BACKOFF_S).delays()
        while records and not self._stop.is_set():
            try:
                await handler(records)
                return
            except Exception as exc:
                if is_transient(exc):
                    delay = next(delays)
                    log.warning("holding %d records uncommitted after a transient failure (%s); retrying in %.2f s",
                                len(records), describe_failure(exc, 300), delay)
                    self.metrics.batch_retries.inc()
                    await self._hold(records, delay)
                elif len(records) > 1:
                    log.error("a batch of %d records failed (%s): handling them one by one", len(records),
                              describe_failure(exc, 300), exc_info=exc)
                    for record in records:
                        await self.process([record])
                    return
                elif handler == self.handle_batch:
                    handler = functools.partial(self._dead_letter_and_commit, failure=exc)
                else:
                    raise  # dead-lettering failed for a reason of its own: DeadLetters makes that transient

    async def _dead_letter_and_commit(self, records: list[ConsumerRecord], failure: Exception) -> None:
        letters = _Outbox()
        for record in records:
            letters.dead_letter(self.dead_letters.letter(record, "dispatch", failure), "internal_error")
        await self._deliver(letters)
        await self._commit(records)

    async def handle_batch(self, records: list[ConsumerRecord]) -> None:
        """Admit, route, publish, answer, dead-letter and commit one batch of consumed records (module doc).
        Raises only on a transient failure (the batch is then not committed) or a bug of the batch path."""
        consumed_at = time.perf_counter()
        consumed_ns = time.time_ns()
        outcome = await self._ensure_workers(records)
        if outcome is WaitOutcome.STOPPED:
            return  # not committed: the group hands these records to another dispatcher
        self.metrics.batch_size.observe(len(records))
        out = _Outbox()
        requests: list[InferenceRequest] = []
        accepted: list[ConsumerRecord] = []
        for record in records:
            try:
                requests.append(self.limits.decode_request(record.value))
                accepted.append(record)
            except Exception as exc:  # whatever refuses a record at admission is the record's own fault
                out.dead_letter(self.dead_letters.letter(record, "validate", exc), "invalid_request")
        group = self.settings.dispatcher.consumer_group
        spans = [
            tracing.start_process_span(self.tracer, tracing.OP_ROUTE, record, request_id=request.request_id,
                                       group=group, start_time_ns=consumed_ns)
            for request, record in zip(requests, accepted, strict=True)
        ]
        now = now_ms()
        live = []
        for j, request in enumerate(requests):
            expired = deadline_passed(request, now)
            if expired is None:
                live.append(j)
                continue
            tracing.record_error(spans[j], "deadline_exceeded", expired)
            out.answer(accepted[j], request, self._result(request, "error", expired), spans[j], "deadline_exceeded")
            spans[j].end()
            self.stats.expired += 1
        if live:
            live_requests = [requests[j] for j in live]
            live_spans = [spans[j] for j in live]
            if outcome is WaitOutcome.READY:
                origins = [f"{accepted[j].partition}@{accepted[j].offset}" for j in live]
                plan = await self.route_and_publish(live_requests, live_spans, origins=origins,
                                                    started_at=consumed_at)
                for f in plan.failed:
                    record = accepted[live[f.index]]
                    kind = "route_failed" if f.stage == "route" else "publish_failed"
                    out.dead_letter(self.dead_letters.letter(record, f.stage, f.error), kind)
            else:
                self._reject(live_requests, [accepted[j] for j in live], live_spans, out)
        await self._deliver(out)
        await self._commit(records)

    async def route_and_publish(
        self,
        requests: Sequence[InferenceRequest],
        spans: Sequence[Span],
        attempts: Sequence[int] | None = None,
        origins: Sequence[str] | None = None,
        *,
        started_at: float | None = None,
    ) -> BatchPlan:
        """Route `requests` over the routable workers, publish them and wait for every acknowledgement.

        Two Redis round trips whatever the batch size: prefix matches before routing, inserts after.
        `spans` are the requests' `route` spans, in the same order: each gets its decision, its context
        travels in the routed message's headers, and this call ends them all (marked failed if their
        request failed, or if it raises). `attempts` are the delivery attempts to record (re-routing),
        `origins` the requests' records on the requests topic (RoutedRequest.origin); `started_at`
        (perf_counter) is when the batch was consumed.

        A request that fails for a reason of its own (it cannot be described, routed, serialized or
        published: too large, topic refused) is returned in the plan's `failed` (its index in `requests`)
        and the others are routed. A transient failure, including no routable worker, raises.
        """
        if len(spans) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(spans)} spans")
        started_at = time.perf_counter() if started_at is None else started_at
        failed: list[RouteFailure] = []
        try:
            await self.view.refresh()
            await self._sync_capacities()
            view = self.view.cluster_view()
            if not view.worker_ids:
                raise NoRoutableWorker("no routable worker")
            kept: list[int] = []  # indices of the requests that could be described
            infos = []
            for j, request in enumerate(requests):
                try:
                    infos.append(describe(request, self.settings.prefix))
                    kept.append(j)
                except Exception as exc:
                    failed.append(RouteFailure(j, "route", exc))
            matched = await self.prefix_index.match_many([i.block_hashes for i in infos], view.worker_ids)
            plan = self.router.route([requests[j] for j in kept], infos, matched, view,
                                     None if attempts is None else [attempts[j] for j in kept])
            failed += [RouteFailure(kept[f.index], f.stage, f.error) for f in plan.failed]
            sends = []
            for routed in plan.routed:
                j = kept[routed.index]
                tracing.set_decision_attributes(spans[j], routed.decision)
                key = routed.request.request_id.encode()
                headers = tracing.headers_for(spans[j])
                try:
                    payload = self.limits.check_size(
                        RoutedRequest(request=routed.request, decision=routed.decision,
                                      origin="" if origins is None else origins[j]).to_bytes(),
                        "the routed request", key=key, headers=headers)
                    ack = await self.producer.send(self.topics.worker(routed.decision.worker_id), payload, key=key,
                                                   headers=headers)
                except Exception as exc:
                    if is_transient(exc):
                        raise
                    failed.append(RouteFailure(j, "publish", exc))
                    continue
                sends.append((j, routed, ack))
            await self._insert_prefixes(plan)
            acks = await asyncio.gather(*(ack for _, _, ack in sends), return_exceptions=True)
            transient = next((a for a in acks if isinstance(a, Exception) and is_transient(a)), None)
            if transient is not None:
                raise transient
            published = []
            for (j, routed, _), ack in zip(sends, acks, strict=True):
                if isinstance(ack, Exception):
                    failed.append(RouteFailure(j, "publish", ack))
                else:
                    published.append(replace(routed, index=j))
            for f in failed:
                tracing.record_error(spans[f.index], f"{f.stage}_failed", describe_failure(f.error, 500))
        except BaseException as exc:
            for span in spans:
                tracing.record_error(span, type(exc).__qualname__, str(exc) or repr(exc))
            raise
        finally:
            for span in spans:
                span.end()
        for routed in published:
            self.view.note_assigned(routed.decision.worker_id, routed.uncached_tokens, routed.decision.decided_at)
        result = BatchPlan(routed=published, inserts=plan.inserts, failed=sorted(failed, key=lambda f: f.index))
        self._batch_routed(result, started_at)
        return result

    async def _insert_prefixes(self, plan: BatchPlan) -> None:
        """Record the batch's prefixes in the index: a hint, so a Redis out of memory skips it (counted)."""
        try:
            await self.prefix_index.insert_many(
                ((wid, chain) for wid, chains in plan.inserts.items() for chain in chains), time.time()
            )
        except Exception as exc:
            if not is_redis_oom(exc):
                raise
            log.warning("prefix index not updated: Redis is out of memory (%s)", describe_failure(exc, 200))
            self.metrics.record_redis_write_skipped("prefix_insert")

    def _batch_routed(self, plan: BatchPlan, started_at: float) -> None:
        """The one place a routed (and acknowledged) batch is accounted for: stats, metrics, debug log."""
        self.stats.batches += 1
        self.stats.routed += len(plan.routed)
        self.metrics.record_routed(len(plan.routed), time.perf_counter() - started_at)
        for routed in plan.routed:
            self.metrics.record_decision(routed.decision)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("routed %d requests in %.2f ms: %s", len(plan.routed),
                      (time.perf_counter() - started_at) * 1e3,
                      ", ".join(f"{r.request.request_id}->{r.decision.worker_id}" for r in plan.routed))

    async def _ensure_workers(self, records: list[ConsumerRecord]) -> WaitOutcome:
        """Wait with backoff until a worker is routable, holding `records` uncommitted (see `_hold`)."""
        await self.view.refresh()
        await self._sync_capacities()
        if self.view.routable:
            return WaitOutcome.READY
        cfg = self.settings.dispatcher
        started = time.monotonic()
        backoff = cfg.no_worker_backoff_s
        log.warning("no live worker: holding %d records uncommitted, retrying for up to %.0f s",
                    len(records), cfg.no_worker_max_wait_s)
        while True:
            if self._stop.is_set():
                return WaitOutcome.STOPPED
            waited = time.monotonic() - started
            if waited >= cfg.no_worker_max_wait_s:
                log.error("no live worker for %.0f s: rejecting %d held records", waited, len(records))
                return WaitOutcome.EXPIRED
            await self._hold(records, min(backoff, cfg.no_worker_max_wait_s - waited))
            await self.view.refresh(force=True)
            if self.view.routable:
                log.info("workers available again after %.1f s: routing %d held records",
                         time.monotonic() - started, len(records))
                await self._sync_capacities()
                return WaitOutcome.READY
            backoff = min(backoff * 2, _MAX_BACKOFF_S)

    async def _hold(self, records: list[ConsumerRecord], seconds: float) -> None:
        """Wait `seconds` with the assigned partitions paused but polled, so the consumer stays in its group.
        Records a poll still returns join `records`; records of partitions no longer assigned (a rebalance
        moved them: their new owner reads them again) leave it."""
        self.consumer.pause(*self.consumer.assignment())
        try:
            more = await self.consumer.getmany(timeout_ms=int(seconds * 1000) + 1)
        finally:
            self.consumer.resume(*self.consumer.paused())
        records.extend(r for recs in more.values() for r in recs)
        assigned = self.consumer.assignment()
        records[:] = [r for r in records if TopicPartition(r.topic, r.partition) in assigned]

    def _result(self, request: InferenceRequest, status: Status, error: str) -> InferenceResult:
        """A result the dispatcher answers with itself (no worker served the request)."""
        return InferenceResult(request_id=request.request_id, worker_id="", status=status, error=error)

    def _reject(self, requests: list[InferenceRequest], records: list[ConsumerRecord], spans: list[Span],
                out: _Outbox) -> None:
        """Tell each client its request could not be routed, and dead-letter it for operators; ends `spans`."""
        reason = f"no live worker within {self.settings.dispatcher.no_worker_max_wait_s:.0f} s"
        for request, record, span in zip(requests, records, spans, strict=True):
            tracing.record_error(span, "no_worker", reason)
            out.answer(record, request, self._result(request, "rejected", reason), span, "no_worker")
            out.dead_letter(self.dead_letters.letter(record, "route", reason), "no_worker")
            span.end()
        self.stats.rejected += len(requests)

    async def _deliver(self, out: _Outbox) -> None:
        """Publish the batch's answers, then its dead letters, and wait for every acknowledgement. An answer
        refused for a reason of its own (its reply topic refused or missing, too large) becomes a dead letter
        (stage `answer`); a transient failure raises (the batch is held)."""
        sends = []
        for answer in out.answers:
            request_id = answer.result.request_id
            key = request_id.encode()
            try:
                topic = self.limits.reply_topic(answer.request)
                payload = self.limits.check_size(answer.result.to_bytes(), "the answer", key=key,
                                                 headers=answer.headers)
                sends.append((answer, await self.producer.send(topic, payload, key=key, headers=answer.headers)))
            except Exception as exc:
                if is_transient(exc):
                    raise
                out.dead_letter(self.dead_letters.letter(answer.record, "answer", exc), "answer_failed")
        acks = await asyncio.gather(*(ack for _, ack in sends), return_exceptions=True)
        transient = next((a for a in acks if isinstance(a, Exception) and is_transient(a)), None)
        if transient is not None:
            raise transient
        for (answer, _), ack in zip(sends, acks, strict=True):
            if isinstance(ack, Exception):
                out.dead_letter(self.dead_letters.letter(answer.record, "answer", ack), "answer_failed")
            else:
                self.metrics.record_answered(answer.kind)
        await self.dead_letters.send([letter for letter, _ in out.letters])
        for _, kind in out.letters:
            self.metrics.record_dead_letter(kind)
        self.stats.dead_letters += len(out.letters)

    async def _takeover_dead_letter(self, letter: DeadLetter) -> None:
        """A routed message of a dead worker's topic that cannot be re-routed."""
        await self.dead_letters.send([letter])
        self.metrics.record_dead_letter("invalid_routed_request")
        self.stats.dead_letters += 1

    async def _commit(self, records: list[ConsumerRecord]) -> None:
        """Start committing the batch's offsets; the commit overlaps the next batch's routing.

        Commits stay in order (each waits for the previous one), start only after the batch's
        publishes are acknowledged, and the last one is awaited before the consumer stops.
        """
        offsets: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
        await self._settle_commit()
        self._commit_task = asyncio.create_task(self._commit_offsets(offsets, len(records)))

    async def _settle_commit(self) -> None:
        """Wait for the commit in flight, if any."""
        if self._commit_task is not None:
            task, self._commit_task = self._commit_task, None
            await task

    async def _commit_offsets(self, offsets: dict[TopicPartition, int], n_records: int) -> None:
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            # The partitions moved to another dispatcher mid-batch: it will route these records again
            # (their first routing is already published; workers dedupe by request id).
            log.warning("commit of %d records failed after a rebalance: %s", n_records, exc)

    async def _sync_capacities(self) -> None:
        """Size each worker's prefix index to its KV cache (in blocks) when the worker reports it: once per
        registry read, whoever made it (the dead-worker takeover refreshes the view too), the changed ones in
        one round trip (one per worker cost 256 round trips at 256 workers)."""
        if self.view.generation == self._capacities_generation:
            return
        self._capacities_generation = self.view.generation
        tokens_per_block = self.settings.prefix.tokens_per_block
        changed = {w.worker_id: blocks for w in self.view.routable
                   if (blocks := w.max_kv_tokens // tokens_per_block) > 0
                   and self._capacities.get(w.worker_id) != blocks}
        if not changed:
            return
        try:
            await self.prefix_index.set_capacities(changed)
        except Exception as exc:  # a sizing hint: a Redis out of memory skips it (counted; retried next read)
            if not is_redis_oom(exc):
                raise
            self.metrics.record_redis_write_skipped("prefix_capacity")
            return
        self._capacities.update(changed)

    async def _on_snapshot(self, snapshot: Snapshot) -> None:
        if snapshot.version <= self.model_version or not isinstance(self.policy, SnapshotPolicy):
            return
        try:
            self.policy.load_snapshot(snapshot)
        except SnapshotError as exc:
            log.error("model snapshot v%d not usable, keeping v%d: %s", snapshot.version, self.model_version, exc)
            return
        previous, self.model_version = self.model_version, snapshot.version
        created_at = snapshot.meta.get("created_at_s")
        created_at_s = float(created_at) if isinstance(created_at, int | float) else None
        self.metrics.snapshot_loaded(snapshot.version, created_at_s)
        self.health.set("model", True, f"model snapshot v{snapshot.version} loaded")
        log.info("model snapshot v%d (%s, validated=%s) replaces v%d", snapshot.version, snapshot.family,
                 snapshot.validated, previous)

    async def _log_stats(self) -> None:
        last, last_t = 0, time.monotonic()
        while True:
            await asyncio.sleep(_STATS_EVERY_S)
            now = time.monotonic()
            s = self.stats
            log.info("routed %d (%.1f/s), re-routed %d, dead letters %d, rejected %d, expired %d; model v%d; "
                     "%d partitions", s.routed, (s.routed - last) / (now - last_t), self.takeover.rerouted,
                     s.dead_letters, s.rejected, s.expired, self.model_version, len(self.consumer.assignment()))
            last, last_t = s.routed, now
