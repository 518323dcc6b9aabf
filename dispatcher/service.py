"""The dispatcher service: consume requests in batches, route them, publish to worker topics, commit.

Per batch of records from `lodestar.requests` (one consumer group shared by every dispatcher):
validate (invalid -> `lodestar.dlq` with the reason), describe each request (prefix block hashes), one
Redis round trip for the prefix matches of the whole batch, route one request after the other
(dispatcher.routing), publish each RoutedRequest to its worker's topic, one Redis round trip for the
prefix inserts, await every publish acknowledgement, then commit the batch's offsets. A crash before
the commit re-routes the batch (at-least-once); workers dedupe by request id.

With no routable worker the batch is held, not committed, and retried with backoff for at most
`no_worker_max_wait_s`; after that each request gets a `rejected` result on its reply topic and a dead
letter, so nothing is dropped silently. The model snapshot (for policies that use one) is loaded at
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
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from opentelemetry.trace import Span

from dispatcher.policies.base import Policy, SnapshotPolicy
from dispatcher.policies.registry import check_params_by_policy, make_policy
from dispatcher.redis_prefix_index import RedisPrefixIndex
from dispatcher.redispatch import DeadWorkerTakeover
from dispatcher.routing import BatchPlan, BatchRouter, describe
from dispatcher.worker_view import WorkerView
from lodestar import tracing
from lodestar.health import GroupJoined, Health
from lodestar.kafka_admin import fixed_topic_partitions
from lodestar.kafka_io import dead_letter_for, make_consumer, make_producer, send_dead_letter
from lodestar.lifecycle import ServiceScope, service_lifecycle
from lodestar.metrics import DispatcherMetrics
from lodestar.names import RedisKeys, Topics
from lodestar.redis_io import make_redis
from lodestar.schemas import DeadLetter, InferenceRequest, InferenceResult, InvalidMessage, RoutedRequest, decode
from lodestar.settings import Settings
from lodestar.snapshot import Snapshot, SnapshotError
from lodestar.snapshot_keys import verification_keys
from lodestar.snapshot_store import SnapshotStore
from lodestar.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)

SERVICE = "dispatcher"
_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
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


def validate_request(raw: bytes | None) -> InferenceRequest:
    """Decode and check one request; raises InvalidMessage with a readable reason."""
    if raw is None:
        raise InvalidMessage("empty message (no value)")
    request = decode(InferenceRequest, raw)
    if request.reply_to is not None and not _TOPIC_NAME.match(request.reply_to):
        raise InvalidMessage(f"invalid InferenceRequest: reply_to {request.reply_to!r} is not a Kafka topic name")
    return request


class WaitOutcome(Enum):
    READY = "ready"
    EXPIRED = "expired"
    STOPPED = "stopped"


@dataclass(slots=True)
class DispatcherStats:
    """Running totals, for the periodic log line (the Prometheus series are in `Dispatcher.metrics`)."""

    batches: int = 0
    routed: int = 0
    dead_letters: int = 0
    rejected: int = 0


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
        )
        self.stats = DispatcherStats()
        self.metrics = metrics if metrics is not None else DispatcherMetrics()
        self.tracer = tracing.get_tracer(SERVICE)
        self.model_version = 0
        self._capacities: dict[str, int] = {}
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
                await self.handle_batch(records)

    async def handle_batch(self, records: list[ConsumerRecord]) -> None:
        """Validate, route, publish and commit one batch of consumed records (see the module doc)."""
        consumed_at = time.perf_counter()
        consumed_ns = time.time_ns()
        outcome = await self._ensure_workers(records)
        if outcome is WaitOutcome.STOPPED:
            return  # not committed: the group hands these records to another dispatcher
        self.metrics.batch_size.observe(len(records))
        requests: list[InferenceRequest] = []
        accepted: list[ConsumerRecord] = []
        letters = []
        for record in records:
            try:
                requests.append(validate_request(record.value))
                accepted.append(record)
            except InvalidMessage as exc:
                letters.append(dead_letter_for(record, stage="validate", service=SERVICE, reason=exc.reason))
        if letters:
            await asyncio.gather(*(send_dead_letter(self.producer, self.topics, d) for d in letters))
            self.stats.dead_letters += len(letters)
            for _ in letters:
                self.metrics.record_dead_letter("invalid_request")
        if requests:
            group = self.settings.dispatcher.consumer_group
            spans = [
                tracing.start_process_span(self.tracer, tracing.OP_ROUTE, record, request_id=request.request_id,
                                           group=group, start_time_ns=consumed_ns)
                for request, record in zip(requests, accepted, strict=True)
            ]
            if outcome is WaitOutcome.READY:
                await self.route_and_publish(requests, spans, started_at=consumed_at)
            else:
                await self._reject(requests, accepted, spans)
        await self._commit(records)

    async def route_and_publish(
        self,
        requests: Sequence[InferenceRequest],
        spans: Sequence[Span],
        attempts: Sequence[int] | None = None,
        *,
        started_at: float | None = None,
    ) -> BatchPlan:
        """Route `requests` over the routable workers, publish them and wait for every acknowledgement.

        Two Redis round trips whatever the batch size: prefix matches before routing, inserts after.
        `spans` are the requests' `route` spans, in the same order: each gets its decision, its context
        travels in the routed message's headers, and this call ends them all (marked failed if it
        raises). `attempts` are the delivery attempts to record (re-routing); `started_at`
        (perf_counter) is when the batch was consumed. Raises ValueError if no worker is routable
        (callers check first).
        """
        if len(spans) != len(requests):
            raise ValueError(f"{len(requests)} requests but {len(spans)} spans")
        started_at = time.perf_counter() if started_at is None else started_at
        try:
            if await self.view.refresh():
                await self._sync_capacities()
            view = self.view.cluster_view()
            infos = [describe(r, self.settings.prefix) for r in requests]
            matched = await self.prefix_index.match_many([i.block_hashes for i in infos], view.worker_ids)
            plan = self.router.route(requests, infos, matched, view, attempts)
            acks = []
            for routed, span in zip(plan.routed, spans, strict=True):
                tracing.set_decision_attributes(span, routed.decision)
                message = RoutedRequest(request=routed.request, decision=routed.decision)
                acks.append(await self.producer.send(
                    self.topics.worker(routed.decision.worker_id), message.to_bytes(),
                    key=routed.request.request_id.encode(), headers=tracing.headers_for(span),
                ))
            await self.prefix_index.insert_many(
                ((wid, chain) for wid, chains in plan.inserts.items() for chain in chains), time.time()
            )
            await asyncio.gather(*acks)
        except BaseException as exc:
            for span in spans:
                tracing.record_error(span, type(exc).__qualname__, str(exc) or repr(exc))
            raise
        finally:
            for span in spans:
                span.end()
        for routed in plan.routed:
            self.view.note_assigned(routed.decision.worker_id, routed.uncached_tokens, routed.decision.decided_at)
        self._batch_routed(plan, started_at)
        return plan

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
        """Wait with backoff until a worker is routable, holding `records` uncommitted.

        While waiting the assigned partitions are paused but polled, so the consumer stays in its group;
        anything a poll still returns joins the held batch.
        """
        if await self.view.refresh():
            await self._sync_capacities()
        if self.view.routable:
            return WaitOutcome.READY
        cfg = self.settings.dispatcher
        started = time.monotonic()
        backoff = cfg.no_worker_backoff_s
        log.warning("no live worker: holding %d records uncommitted, retrying for up to %.0f s",
                    len(records), cfg.no_worker_max_wait_s)
        try:
            while True:
                if self._stop.is_set():
                    return WaitOutcome.STOPPED
                waited = time.monotonic() - started
                if waited >= cfg.no_worker_max_wait_s:
                    log.error("no live worker for %.0f s: rejecting %d held records", waited, len(records))
                    return WaitOutcome.EXPIRED
                self.consumer.pause(*self.consumer.assignment())
                more = await self.consumer.getmany(timeout_ms=int(min(backoff, cfg.no_worker_max_wait_s - waited)
                                                                  * 1000) + 1)
                records.extend(r for recs in more.values() for r in recs)
                await self.view.refresh(force=True)
                if self.view.routable:
                    log.info("workers available again after %.1f s: routing %d held records",
                             time.monotonic() - started, len(records))
                    await self._sync_capacities()
                    return WaitOutcome.READY
                backoff = min(backoff * 2, _MAX_BACKOFF_S)
        finally:
            self.consumer.resume(*self.consumer.paused())

    async def _reject(
        self, requests: list[InferenceRequest], records: list[ConsumerRecord], spans: list[Span]
    ) -> None:
        """Tell each client its request could not be routed, and dead-letter it for operators; ends `spans`."""
        reason = f"no live worker within {self.settings.dispatcher.no_worker_max_wait_s:.0f} s"
        try:
            sends = []
            for request, record, span in zip(requests, records, spans, strict=True):
                tracing.record_error(span, "no_worker", reason)
                result = InferenceResult(request_id=request.request_id, worker_id="", status="rejected", error=reason)
                sends.append(await self.producer.send(
                    request.reply_to or self.topics.results, result.to_bytes(), key=request.request_id.encode(),
                    headers=tracing.headers_for(span),
                ))
                sends.append(send_dead_letter(
                    self.producer, self.topics, dead_letter_for(record, stage="route", service=SERVICE, reason=reason)
                ))
            await asyncio.gather(*sends)
        finally:
            for span in spans:
                span.end()
        self.stats.rejected += len(requests)
        self.stats.dead_letters += len(requests)
        for _ in requests:
            self.metrics.record_dead_letter("no_worker")

    async def _takeover_dead_letter(self, letter: DeadLetter) -> None:
        """A routed message found unreadable on a dead worker's topic during takeover."""
        await send_dead_letter(self.producer, self.topics, letter)
        self.metrics.record_dead_letter("invalid_routed_request")

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
        """Size each worker's prefix index to its KV cache (in blocks) when the worker reports it."""
        tokens_per_block = self.settings.prefix.tokens_per_block
        for w in self.view.routable:
            blocks = w.max_kv_tokens // tokens_per_block
            if blocks > 0 and self._capacities.get(w.worker_id) != blocks:
                await self.prefix_index.set_capacity(w.worker_id, blocks)
                self._capacities[w.worker_id] = blocks

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
            log.info("routed %d (%.1f/s), re-routed %d, dead letters %d, rejected %d; model v%d; %d partitions",
                     s.routed, (s.routed - last) / (now - last_t), self.takeover.rerouted, s.dead_letters, s.rejected,
                     self.model_version, len(self.consumer.assignment()))
            last, last_t = s.routed, now
