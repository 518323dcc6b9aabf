"""The worker service: serves the routed requests of one SGLang engine, at least once, answered once.

One process per engine. It creates its topic `lodestar.worker.<id>`, consumes it in the consumer
group `Topics.worker_group(id)` (`lodestar-worker-<id>`: a dispatcher may join that group to
re-route the backlog of a worker that stays dead), and registers in Redis (WorkerRegistry), renewing
its state every min(load_poll_s, heartbeat_s) while its engine answers load polls.

Each record is handled by `WorkerService.handle_record`, many at once (up to max_concurrency; the
engine batches): decode and check it again (size, schema, token range, allowed reply topic:
lodestar.limits; refused -> DLQ), dedupe by request id (see workers/dedupe.py: a request id used again
gets its stored result replayed, or an `error` result), answer a request past its `deadline_ms` with an
`error` result instead of calling the engine, stream the generation from the engine
(workers/sglang_client.py), publish the InferenceResult to the request's reply topic and a
TelemetryEvent to the telemetry topic, await both acks, then mark the record complete. Offsets are
committed in order (workers/offsets.py): a partition's commit point only passes records whose work is
complete, so a crash redelivers exactly the unfinished ones.

Engine failures become results, never lost records: 408/429/5xx/connection errors are retried with jittered
backoff within a retry budget (workers/retry.py), then an `error` result; a 400 is a `rejected` result; a
generation is cut at worker.generation_timeout_s or its deadline_ms. Consecutive engine failures (or an engine
silent on load polls for longer than the state TTL) open the circuit breaker (workers/breaker.py): the engine
is declared dead, the worker deregisters, abandons its in-flight requests (leases released, records
uncommitted), leaves its group, and rejoins once a half-open probe succeeds.
Redis or broker failures are classified by lodestar.faults: transient ones (unreachable, timeouts) are retried
with backoff until they heal (the record stays uncommitted meanwhile); one of the record's own (its result too
large for the broker: an `error` result instead; its reply topic refused or missing; a bug it triggers) sends
the record to the DLQ with the reason and the record completes: nothing is retried for ever. Storing the
outcome and marking it done are skipped (logged, counted) when Redis is out of memory.

Observability: each decoded record is handled inside a `serve` span (child of the dispatcher's
`route` span, from the record's headers) with the request id bound to every log line; the engine call
is a GenAI child span (an event at the first token, token usage); result and telemetry carry the
`serve` span's context in their headers (the learner links to it). `self.metrics`
(lodestar.metrics.WorkerMetrics) observes TTFT/TPOT/E2E, requests in flight, results by status and
engine errors by kind (docs/observability.md). `self.health` (lodestar.health) is ready while the engine
answers and the worker is a member of its group, and not once it drains.

SIGTERM/SIGINT drain: the state is published with draining=true (dispatchers stop routing here),
fetching stops, in-flight requests finish and are committed, the worker deregisters and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.errors import KafkaError
from opentelemetry import trace
from redis.exceptions import RedisError

from lodestar import tracing
from lodestar.faults import Backoff, describe, is_redis_oom, retry_transient
from lodestar.health import GroupJoined, Health
from lodestar.kafka_admin import fixed_topic_partitions
from lodestar.kafka_io import DeadLetters, make_consumer, make_producer
from lodestar.lifecycle import service_lifecycle
from lodestar.limits import Limits, OversizedMessage, deadline_passed
from lodestar.logs import bind_request_id
from lodestar.metrics import WorkerMetrics
from lodestar.names import RedisKeys, Topics, check_worker_id
from lodestar.redis_io import make_redis
from lodestar.schemas import (
    MAX_NAME_CHARS,
    MAX_REASON_CHARS,
    InferenceRequest,
    InferenceResult,
    InvalidMessage,
    RoutedRequest,
    SamplingParams,
    Status,
    TelemetryEvent,
    clip,
    now_ms,
)
from lodestar.settings import Settings
from lodestar.worker_registry import WorkerRegistry
from workers.breaker import CircuitBreaker, EngineGuard, supervise
from workers.dedupe import Claim, CompletedRequest, RequestLedger, request_digest
from workers.live_state import LiveState, estimate_uncached_tokens
from workers.offsets import OffsetTracker
from workers.retry import RetryBudget, RetryPolicy
from workers.sglang_client import (
    EngineError,
    EngineRejected,
    EngineUnavailable,
    Generation,
    SGLangClient,
    StreamMeter,
)
from workers.streaming import ChunkPublisher, ChunksUndelivered, serve_streamed

log = logging.getLogger(__name__)

SERVICE = "worker"
FETCH_WAIT_MS = 100
FULL_WAIT_S = 1.0  # when every slot is busy: how long to wait for one before polling Kafka again
CLAIM_POLL_S = 0.2  # how often to look again at a request id leased by another worker
INFRA_BACKOFF_MAX_S = 5.0
REDIS_CONNECTIONS = 32

T = TypeVar("T")


class ClientAborted(EngineError):
    """The request's client went away (an abort key in Redis): the generation was stopped."""

    def __init__(self) -> None:
        super().__init__("aborted: the client went away", 499)


def engine_error_kind(exc: EngineError) -> str:
    """The bounded label of a failed engine call: `rejected` (input refused), `unavailable` (overloaded or
    unreachable after retries), `aborted` (by its client) or `failed` (timed out, aborted by the engine, ended
    without output)."""
    if isinstance(exc, EngineRejected):
        return "rejected"
    if isinstance(exc, EngineUnavailable):
        return "unavailable"
    if isinstance(exc, ClientAborted):
        return "aborted"
    return "failed"


def error_status(exc: EngineError) -> int:
    """The HTTP status a front door answers for a failed request (InferenceResult.error_status)."""
    if exc.status is not None:
        return exc.status
    if isinstance(exc, EngineRejected):
        return 400
    return 503 if isinstance(exc, EngineUnavailable) else 502


class WorkerService:
    """Consumes `lodestar.worker.<id>`, serves each request on the engine, publishes result and telemetry."""

    def __init__(
        self,
        settings: Settings,
        *,
        engine: SGLangClient | None = None,
        redis_client: aioredis.Redis | None = None,
        metrics: WorkerMetrics | None = None,
    ):
        w = settings.worker
        self.settings = settings
        self.worker_id = check_worker_id(w.worker_id)
        self.instance = uuid.uuid4().hex[:12]
        self.topics = Topics(settings.kafka.topic_prefix)
        self.topic = self.topics.worker(self.worker_id)
        self.group_id = self.topics.worker_group(self.worker_id)
        self.engine = engine or SGLangClient(
            w.sglang_url,
            request_timeout_s=w.request_timeout_s,
            retry=RetryPolicy(w.retry_attempts, w.retry_backoff_s, w.retry_max_backoff_s,
                              budget=RetryBudget(w.retry_budget_ratio)),
            api_key=w.engine_api_key.get_secret_value() or None,
        )
        self.state = LiveState(self.worker_id, w.gpu_type, self.topic)
        self.metrics = metrics if metrics is not None else WorkerMetrics(self.worker_id)
        self.breaker = CircuitBreaker(w.breaker_failures, w.breaker_cooldown_s,
                                      on_change=lambda state: self.metrics.record_breaker(state.value))
        self.guard = EngineGuard(self.breaker, w.generation_timeout_s)
        self.health = Health("engine", "group")
        self.tracer = tracing.get_tracer(SERVICE)
        # Every in-flight request talks to Redis: share a bounded pool and queue for a connection
        # rather than fail when max_concurrency exceeds it.
        self._redis = redis_client or make_redis(settings, pool_size=REDIS_CONNECTIONS)
        keys = RedisKeys(settings.redis.key_prefix)
        self.registry = WorkerRegistry(self._redis, keys, w.state_ttl_s)
        self.ledger = RequestLedger(
            self._redis, keys, owner=f"{self.worker_id}/{self.instance}", lease_s=w.state_ttl_s,
            done_ttl_s=w.dedupe_ttl_s, max_stored_text_bytes=w.max_stored_text_bytes,
        )
        self.limits = Limits(settings)
        self.backoff = Backoff(w.retry_backoff_s, INFRA_BACKOFF_MAX_S)
        self.offsets: OffsetTracker[TopicPartition] = OffsetTracker()
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: dict[str, asyncio.Future[None]] = {}  # request id -> its handling in this process
        self._claimed: set[str] = set()  # request ids whose lease this instance renews
        self._aborts: dict[str, asyncio.Event] = {}  # request id -> set when its client asked to abort it
        self._draining = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._commit_wanted = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._engine_ok_at = 0.0

    # ---- lifecycle -------------------------------------------------------------------------------

    def request_drain(self) -> None:
        """Stop taking work, finish what is in flight, then leave (SIGTERM/SIGINT)."""
        if self._draining.is_set():
            return
        log.info("worker %s draining: %d in flight", self.worker_id, len(self._tasks))
        self.health.set("group", False, "draining: takes no more work")
        self.state.draining = True
        self._draining.set()
        self._slot_free.set()

    async def run(self) -> None:
        """Serve until drained (returns) or cancelled (in-flight work is abandoned to redelivery)."""
        topics = {**fixed_topic_partitions(self.settings), self.topic: self.settings.kafka.worker_partitions}
        self._producer = producer = make_producer(self.settings, client_id=f"worker-{self.worker_id}")
        self._consumer = consumer = make_consumer(
            self.settings, group_id=self.group_id, client_id=f"worker-{self.worker_id}",
            max_poll_records=self.settings.worker.max_concurrency,
        )
        drained = False

        async def leave() -> None:
            """Once the heartbeat has stopped: abandon what is still in flight (unless drained), deregister."""
            if not drained:
                await self._abandon_in_flight()
            with contextlib.suppress(RedisError, OSError):
                await self.registry.deregister(self.worker_id)

        closers = [self.engine.aclose, functools.partial(self._redis.aclose, close_connection_pool=True)]
        async with service_lifecycle(self.settings, topics, producer=producer, consumers=[consumer],
                                     closers=closers) as scope:
            scope.on_stop(leave)
            await self._wait_for_engine()
            # Join the group only now: a worker whose engine never answers leaves its backlog to takeover.
            consumer.subscribe([self.topic], listener=_CommitOnRevoke(self))
            await self._publish_state()
            scope.spawn(self._state_loop())
            scope.spawn(self._commit_loop())
            scope.spawn(supervise(self.breaker, probe=self._probe, on_dead=self._engine_dead,
                                  on_alive=self._engine_alive,
                                  probe_timeout_s=self.settings.worker.breaker_probe_timeout_s))
            log.info("worker %s serving %s (group %s, gpu %s)", self.worker_id, self.topic, self.group_id,
                     self.state.gpu_type)
            await self._fetch_loop()
            await self._publish_state()
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            await self._commit()
            drained = True
        log.info("worker %s stopped", self.worker_id)

    async def _wait_for_engine(self) -> None:
        """Register only once the engine answers: until then nothing should be routed here."""
        tick = min(self.settings.worker.load_poll_s, self.settings.worker.heartbeat_s)
        warned_at = 0.0
        while not self._draining.is_set():
            try:
                self.state.engine = await self.engine.load()
                self._engine_ok_at = time.monotonic()
                self.health.set("engine", True, "the engine answers load polls")
                return
            except EngineError as exc:
                if time.monotonic() - warned_at > 5.0:
                    log.warning("worker %s waiting for its engine: %s", self.worker_id, exc)
                    warned_at = time.monotonic()
            await asyncio.sleep(tick)

    async def _abandon_in_flight(self) -> None:
        """Hard stop: cancel in-flight requests (each releases its claim); their records stay uncommitted."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)

    # ---- consuming -------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        assert self._consumer is not None
        consumer = self._consumer
        limit = self.settings.worker.max_concurrency
        paused = False
        while not self._draining.is_set():
            if not self.breaker.routable:  # the engine is declared dead: out of the group until a probe succeeds
                await asyncio.sleep(FETCH_WAIT_MS / 1000)
                continue
            self._slot_free.clear()
            free = limit - len(self._tasks)
            if free <= 0:
                if not paused:
                    consumer.pause(*consumer.assignment())
                    paused = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(FULL_WAIT_S):
                        await self._slot_free.wait()
                await consumer.getmany(timeout_ms=0)  # paused: returns nothing, keeps the group membership
                continue
            if paused:
                consumer.resume(*consumer.assignment())
                paused = False
            try:
                batches = await consumer.getmany(timeout_ms=FETCH_WAIT_MS, max_records=free)
            except KafkaError as exc:  # the consumer reconnects by itself; keep polling
                log.warning("worker %s: fetch failed: %r", self.worker_id, exc)
                await asyncio.sleep(self.settings.worker.retry_backoff_s)
                continue
            if not self.breaker.routable:  # declared dead meanwhile: these stay uncommitted for whoever comes next
                continue
            for tp, records in batches.items():
                for record in records:
                    self.offsets.fetched(tp, record.offset)
                    task = asyncio.create_task(self._run_record(record))
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot_free.set()

    async def _run_record(self, record: ConsumerRecord) -> None:
        try:
            await self.handle_record(record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the record's own failure (transient ones are retried inside): to the DLQ
            log.exception("worker %s failed on %s[%d]@%d", self.worker_id, record.topic, record.partition,
                          record.offset)
            await self._dead_letter(record, "serve", exc)
        self._complete(record)

    async def handle_record(self, record: ConsumerRecord) -> None:
        """The one place a consumed record is handled: decode, then (in its `serve` span, with its request
        id on every log line) dedupe, serve, publish."""
        try:
            routed = self._decode(record)
        except Exception as exc:  # whatever refuses a record at decoding is the record's own fault
            await self._dead_letter(record, "decode", exc)
            return
        rid = routed.request.request_id
        span = tracing.start_process_span(self.tracer, tracing.OP_SERVE, record, request_id=rid, group=self.group_id)
        with trace.use_span(span, end_on_exit=True), bind_request_id(rid):
            await self._handle_once(routed, record)

    async def _handle_once(self, routed: RoutedRequest, record: ConsumerRecord) -> None:
        """Serve `routed`, after any handling of the same request id in this process has finished (the id
        is then done: this record gets the replay, or the conflict, that any later use gets)."""
        rid = routed.request.request_id
        earlier = self._active.get(rid)
        if earlier is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(earlier)
        handled: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._active[rid] = handled
        try:
            await self._serve(routed, record)
            handled.set_result(None)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                handled.cancel()
            else:
                handled.set_exception(exc)
            raise
        finally:
            if self._active.get(rid) is handled:
                del self._active[rid]
            if handled.done() and not handled.cancelled():
                handled.exception()  # mark retrieved: waiters may not exist

    def _decode(self, record: ConsumerRecord) -> RoutedRequest:
        routed = self.limits.decode(RoutedRequest, record.value)
        if routed.decision.worker_id != self.worker_id:
            raise InvalidMessage(
                f"routed to worker {routed.decision.worker_id!r} but found on {self.topic!r}"
            )
        self.limits.check_request(routed.request)  # token ids in range, reply topic allowed
        return routed

    def _complete(self, record: ConsumerRecord) -> None:
        if self.offsets.completed(TopicPartition(record.topic, record.partition), record.offset):
            self._commit_wanted.set()

    # ---- serving ---------------------------------------------------------------------------------

    async def _serve(self, routed: RoutedRequest, record: ConsumerRecord) -> None:
        request = routed.request
        rid = request.request_id
        claim = await self._claim(rid)
        digest = request_digest(request)
        stored = claim.stored
        try:
            if claim.state == "done" and claim.is_redelivery(routed.origin, digest):
                log.info("worker %s: request %s already answered; skipping the redelivery", self.worker_id, rid)
                trace.get_current_span().set_attribute(tracing.ATTR_STATUS, "already_answered")
                return
            if not claim.same_request(digest):
                reason = (f"request id {rid!r} was already used by a different request within the dedupe window "
                          f"(worker.dedupe_ttl_s={self.settings.worker.dedupe_ttl_s} s)")
                await self._answer(request, self._result(request, "error", reason), "id_conflict")
                await self._dead_letter(record, "dedupe", reason)
                return
            if claim.state == "done":
                await self._replay(request, stored)
                return
            if stored is not None and stored.text_kept:
                log.info("worker %s: request %s was finished by a predecessor; publishing it", self.worker_id, rid)
                completed = stored
            else:
                expired = deadline_passed(request, now_ms())
                completed = await (self._generate(routed, digest, aborted=claim.aborted) if expired is None
                                   else self._expired(routed, digest, expired))
                await self._store(completed)
            await self._publish_completed(completed, record)
            await self._write_inessential(lambda: self.ledger.mark_done(rid, routed.origin, digest), "mark_done")
            self._claimed.discard(rid)
        finally:
            if rid in self._claimed:  # not finished (a conflict, stopped, or a bug): a redelivery takes it at once
                self._claimed.discard(rid)
                with contextlib.suppress(RedisError, OSError):
                    await self.ledger.release(rid)

    async def _replay(self, request: InferenceRequest, stored: CompletedRequest | None) -> None:
        """Answer a request whose id is done: its stored result again, marked `replayed`, to this request's
        reply topic; or an `error` result saying why it cannot be replayed."""
        rid = request.request_id
        if stored is not None and stored.text_kept:
            log.info("worker %s: request %s was answered before; replaying its result", self.worker_id, rid)
            await self._answer(request, stored.result.model_copy(update={"replayed": True}), "replayed")
            return
        if stored is None:
            reason = (f"request id {rid!r} was already answered within the dedupe window and its result is no "
                      "longer stored")
        else:
            reason = (f"request id {rid!r} was already answered within the dedupe window; its text "
                      f"({stored.text_bytes} bytes) exceeded worker.max_stored_text_bytes and was not kept")
        await self._answer(request, self._result(request, "error", reason), "not_replayable")

    async def _answer(self, request: InferenceRequest, result: InferenceResult, kind: str) -> None:
        """Publish a result (no telemetry: nothing was served) to the request's reply topic."""
        trace.get_current_span().set_attribute(tracing.ATTR_STATUS, kind)
        completed = CompletedRequest(reply_topic=self.limits.reply_topic(request), result=result, telemetry=None)
        await self._retry(lambda: self._publish(completed), "publish an answer")
        self.metrics.record_answered(kind)

    def _result(self, request: InferenceRequest, status: Status, error: str) -> InferenceResult:
        return InferenceResult(request_id=request.request_id, worker_id=self.worker_id, status=status,
                               error=clip(error, MAX_REASON_CHARS))

    async def _claim(self, rid: str) -> Claim:
        """Own the request id, or learn it is done; waits while another live worker holds it."""
        waited = False
        while True:
            claim = await self._retry(lambda: self.ledger.claim(rid), "claim the request")
            if claim.state == "claimed":
                self._claimed.add(rid)
            if claim.state != "held":
                return claim
            if not waited:
                log.info("worker %s: request %s is held by %s; waiting", self.worker_id, rid, claim.holder)
                waited = True
            await asyncio.sleep(CLAIM_POLL_S)

    async def _expired(self, routed: RoutedRequest, digest: str, reason: str) -> CompletedRequest:
        """The outcome of a request whose deadline passed before it reached the engine: not generated."""
        request = routed.request
        log.info("worker %s: request %s not served: %s", self.worker_id, request.request_id, reason)
        self.metrics.record_answered("deadline_exceeded")
        result = self._result(request, "error", reason)
        telemetry = TelemetryEvent(request_id=request.request_id, decision=routed.decision,
                                   gpu_type=self.state.gpu_type, status="error", sent_at=now_ms())
        return CompletedRequest(reply_topic=self.limits.reply_topic(request), result=result, telemetry=telemetry,
                                request_digest=digest)

    async def _generate(self, routed: RoutedRequest, digest: str, aborted: bool = False) -> CompletedRequest:
        """Run the request on the engine and build its result and telemetry (errors included); a request its
        client already aborted is not run. A stream whose chunks the broker did not take is answered as an
        error (its readers see a gap)."""
        request, decision = routed.request, routed.decision
        rid = request.request_id
        started = time.perf_counter()
        sent_at = now_ms()
        self.state.started(rid, estimate_uncached_tokens(routed))
        status: Status = "ok"
        error: str | None = None
        gen: Generation | None = None
        gen_span = tracing.start_generate_span(self.tracer, sampling=request.sampling, worker_id=self.worker_id)

        def on_first_token() -> None:
            self.state.first_token(rid)
            tracing.record_first_token(gen_span, time.perf_counter() - started)

        self.metrics.inflight.inc()
        status_code: int | None = None
        with trace.use_span(gen_span, end_on_exit=True):
            try:
                if aborted:
                    raise ClientAborted()
                gen = await self.guard.run(
                    request, lambda: self._abortable(rid, self._engine_call(request, on_first_token)))
            except EngineError as exc:
                status, error = ("rejected" if isinstance(exc, EngineRejected) else "error"), clip(str(exc),
                                                                                                  MAX_REASON_CHARS)
                status_code = error_status(exc)
                kind = engine_error_kind(exc)
                tracing.record_error(gen_span, kind, error)
                self.metrics.record_engine_error(kind)
            except ChunksUndelivered as exc:
                status, status_code = "error", 502
                error = clip(f"the stream could not be delivered: {describe(exc.cause, 1000)}", MAX_REASON_CHARS)
                tracing.record_error(gen_span, "stream", error)  # the result goes to the same topic: a fault
                # of the topic's fails its publishing too, which dead-letters the record (_publish_completed)
            finally:
                self.metrics.inflight.dec()
                if gen is None:
                    self.state.finished(rid, None)
                else:
                    self.state.finished(rid, gen.ttft_ms, gen.completion_tokens)
                    tracing.record_usage(gen_span, input_tokens=gen.prompt_tokens, output_tokens=gen.completion_tokens,
                                         cached_tokens=gen.cached_tokens, finish_reason=gen.finish_reason)
        if error is not None:
            log.warning("worker %s: request %s %s: %s", self.worker_id, rid, status, error)
        e2e_ms = gen.e2e_ms if gen else (time.perf_counter() - started) * 1000.0
        prompt_tokens = gen.prompt_tokens if gen else len(request.input_ids or ())
        result = InferenceResult(
            request_id=rid,
            worker_id=self.worker_id,
            status=status,
            text=gen.text if gen else "",
            prompt_tokens=prompt_tokens,
            cached_tokens=gen.cached_tokens if gen else 0,
            completion_tokens=gen.completion_tokens if gen else 0,
            ttft_ms=gen.ttft_ms if gen else None,
            tpot_ms=gen.tpot_ms if gen else None,
            e2e_ms=e2e_ms,
            finish_reason=(clip(gen.finish_reason, MAX_NAME_CHARS) if gen and gen.finish_reason
                           else "abort" if status_code == 499 else None),
            error=error,
            error_status=status_code,
        )
        telemetry = TelemetryEvent(
            request_id=rid,
            decision=decision,
            gpu_type=self.state.gpu_type,
            status=status,
            ttft_ms=result.ttft_ms,
            tpot_ms=result.tpot_ms,
            e2e_ms=e2e_ms,
            queue_ms=max(sent_at - decision.decided_at, 0.0),
            prompt_tokens=prompt_tokens,
            cached_tokens=result.cached_tokens,
            completion_tokens=result.completion_tokens,
            sent_at=gen.sent_at_ms if gen else sent_at,
            first_token_at=gen.first_token_at_ms if gen else None,
            finished_at=now_ms(),
        )
        return CompletedRequest(reply_topic=self.limits.reply_topic(request), result=result, telemetry=telemetry,
                                request_digest=digest)

    async def _store(self, completed: CompletedRequest) -> None:
        """Store the outcome before publishing it, so that a successor publishes it without generating
        again and a later use of the id is replayed: useful, not essential (see `_write_inessential`)."""
        await self._write_inessential(lambda: self.ledger.store(completed), "store")

    async def _write_inessential(self, write: Callable[[], Awaitable[object]], kind: str) -> None:
        """A Redis write the request can be answered without: retried while Redis is unreachable, skipped
        (logged and counted) when Redis refuses it for good or is out of memory."""
        try:
            await self._retry(write, f"write {kind} to Redis", give_up=is_redis_oom)
        except Exception as exc:
            log.log(logging.WARNING if isinstance(exc, RedisError) else logging.ERROR,
                    "worker %s: skipped a Redis write (%s): %s", self.worker_id, kind, describe(exc, 300),
                    exc_info=not isinstance(exc, RedisError))
            self.metrics.record_redis_write_skipped(kind)

    async def _publish_completed(self, completed: CompletedRequest, record: ConsumerRecord) -> None:
        """Publish result and telemetry. A result too large for the broker is replaced by an `error` result
        saying so, and the record is dead-lettered; any other failure of the record's own is dead-lettered."""
        try:
            await self._retry(lambda: self._publish(completed), "publish result and telemetry")
        except OversizedMessage as exc:
            short = completed.result.model_copy(update={"status": "error", "text": "", "error": str(exc)})
            await self._retry(lambda: self._publish(completed.model_copy(update={"result": short})),
                              "publish an error result")
            await self._dead_letter(record, "publish", exc)
        except Exception as exc:
            await self._dead_letter(record, "publish", exc)

    async def _engine_call(self, request: InferenceRequest, on_first_token: Callable[[], None]) -> Generation:
        """The generation on the engine: streamed to the reply topic when the request asks for a stream or names
        an engine API (workers/streaming.py), else the plain `/generate` call. Chunks are acknowledged before
        this returns (or raises); ChunksUndelivered if the broker did not take one."""
        if not (request.stream or request.api is not None or request.messages):
            return await self.engine.generate(request, on_first_token=on_first_token)
        assert self._producer is not None
        chunks = ChunkPublisher(self._producer, self.limits.reply_topic(request), request.request_id,
                                self.worker_id, tracing.inject_headers())
        try:
            outcome: Generation | EngineError = await serve_streamed(
                self.engine, request, chunks, StreamMeter(on_first_token=on_first_token))
        except EngineError as exc:
            outcome = exc  # what was streamed before the failure still goes out, ahead of the result
        except (KafkaError, OSError) as exc:  # the producer refused a chunk
            raise ChunksUndelivered(exc) from exc
        except asyncio.CancelledError:  # aborted: what was produced still goes out, ahead of the result
            with contextlib.suppress(Exception):
                await chunks.flush()
            raise
        try:
            await chunks.flush()
        except (KafkaError, OSError) as exc:  # the broker did not take a chunk: the stream has a gap
            raise ChunksUndelivered(exc) from exc
        if isinstance(outcome, EngineError):
            raise outcome
        return outcome

    async def _abortable(self, rid: str, call: Awaitable[Generation]) -> Generation:
        """Await the engine call unless the request's client aborts it first (then the call is cancelled, which
        closes the engine's stream, the engine is told to abort the request id, and ClientAborted is raised)."""
        wanted = self._aborts.setdefault(rid, asyncio.Event())
        work = asyncio.ensure_future(call)
        waiter = asyncio.ensure_future(wanted.wait())
        try:
            await asyncio.wait({work, waiter}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            if not work.done():
                work.cancel()
                await asyncio.gather(work, return_exceptions=True)
            self._aborts.pop(rid, None)
        if not work.cancelled():
            return work.result()
        log.info("worker %s: request %s aborted by its client", self.worker_id, rid)
        await self.engine.abort(rid)
        raise ClientAborted()

    async def _publish(self, completed: CompletedRequest) -> None:
        """Send the result (and the telemetry, if any), both carrying the current (`serve`) span's context,
        and wait for the broker to acknowledge both. OversizedMessage if the result does not fit a record."""
        assert self._producer is not None
        rid = completed.result.request_id
        headers = tracing.inject_headers()
        key = rid.encode()
        payload = self.limits.check_size(completed.result.to_bytes(), "the result", key=key, headers=headers)
        sends = [self._producer.send_and_wait(completed.reply_topic, payload, key=key, headers=headers)]
        if completed.telemetry is not None:
            sends.append(self._producer.send_and_wait(self.topics.telemetry, completed.telemetry.to_bytes(),
                                                      key=self.worker_id.encode(), headers=headers))
        await asyncio.gather(*sends)
        trace.get_current_span().set_attribute(tracing.ATTR_STATUS, completed.result.status)
        self.metrics.record_result(completed.result)

    async def _dead_letter(self, record: ConsumerRecord, stage: str, failure: BaseException | str) -> None:
        """Dead-letter `record` (retried until the dead-letter topic takes it: the record stays uncommitted)."""
        assert self._producer is not None
        dead_letters = DeadLetters(self._producer, self.topics, SERVICE, self.limits.max_message_bytes)
        letter = dead_letters.letter(record, stage, failure)
        await self._retry(lambda: dead_letters.send([letter]), "send a dead letter")
        self.metrics.record_dead_letter(stage)

    async def _retry(self, action: Callable[[], Awaitable[T]], what: str, *,
                     give_up: Callable[[Exception], bool] | None = None) -> T:
        """Run an action on Redis or the broker until it succeeds, retrying transient failures with backoff
        (the record stays uncommitted meanwhile); a failure of the record's own, or one `give_up` names, is
        raised at once."""
        return await retry_transient(action, what=what, backoff=self.backoff, give_up=give_up)

    # ---- state and commits -----------------------------------------------------------------------

    async def _publish_state(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            await self.registry.publish(self.state.snapshot())

    async def _state_loop(self) -> None:
        """Poll the engine's load, publish the live state (the heartbeat) and renew request leases."""
        w = self.settings.worker
        tick = min(w.load_poll_s, w.heartbeat_s)
        next_poll = 0.0
        while True:
            now = time.monotonic()
            if now >= next_poll:
                next_poll = now + w.load_poll_s
                try:
                    self.state.engine = await self.engine.load()
                    self._engine_ok_at = time.monotonic()
                except EngineError as exc:
                    log.warning("worker %s: engine load unavailable: %s", self.worker_id, exc)
            engine_alive = time.monotonic() - self._engine_ok_at <= w.state_ttl_s
            if not engine_alive:
                self.breaker.trip(f"the engine has not answered a load poll for more than {w.state_ttl_s:g} s")
            if self.breaker.routable:
                self.health.set("engine", engine_alive, "the engine answers load polls" if engine_alive else
                                f"the engine has not answered for more than {w.state_ttl_s:g} s")
            try:
                # An engine silent for longer than the state TTL stops the heartbeat: the entry expires
                # and dispatchers stop routing here until the engine answers again.
                if (engine_alive and self.breaker.routable) or self.state.draining:
                    await self.registry.publish(self.state.snapshot())
                await self.ledger.renew(list(self._claimed))
                for rid in await self.ledger.aborted(list(self._aborts)):
                    wanted = self._aborts.get(rid)
                    if wanted is not None:
                        wanted.set()
            except (RedisError, OSError) as exc:
                log.warning("worker %s: heartbeat failed: %r", self.worker_id, exc)
            await asyncio.sleep(tick)

    async def _engine_dead(self) -> None:
        """The breaker opened: stop advertising this worker, abandon the in-flight requests (their leases are
        released, their records stay uncommitted), commit what is complete and leave the group, so that a
        dispatcher's takeover (or this worker, once the engine is back) serves the rest."""
        assert self._consumer is not None
        log.warning("worker %s: engine declared dead (%s); leaving its group, %d requests abandoned to redelivery",
                    self.worker_id, self.breaker.reason, len(self._tasks))
        self.health.set("engine", False, f"circuit breaker open: {self.breaker.reason}")
        with contextlib.suppress(RedisError, OSError):
            await self.registry.deregister(self.worker_id)
        await self._abandon_in_flight()
        await self._commit()
        self.offsets.forget(list(self._consumer.assignment()))
        self._consumer.unsubscribe()

    async def _probe(self) -> None:
        """The half-open probe: the engine answers a load poll and generates one token."""
        self.state.engine = await self.engine.load()
        self._engine_ok_at = time.monotonic()
        await self.engine.generate(InferenceRequest(prompt="ping", sampling=SamplingParams(max_new_tokens=1)))

    async def _engine_alive(self) -> None:
        """The probe succeeded: rejoin the group and advertise this worker again."""
        assert self._consumer is not None
        log.info("worker %s: engine answers again; rejoining %s", self.worker_id, self.group_id)
        self.health.set("engine", True, "the engine answers load polls")
        if not self._draining.is_set():
            self._consumer.subscribe([self.topic], listener=_CommitOnRevoke(self))
        await self._publish_state()

    async def _commit_loop(self) -> None:
        while True:
            await self._commit_wanted.wait()
            self._commit_wanted.clear()
            await self._commit()

    async def _commit(self) -> None:
        """Commit every partition's contiguous completed prefix."""
        assert self._consumer is not None
        async with self._commit_lock:
            offsets = self.offsets.committable()
            if not offsets:
                return
            try:
                await self._consumer.commit(offsets)
            except KafkaError as exc:  # e.g. a rebalance took the partition: its records come again
                log.warning("worker %s: commit of %s failed: %r", self.worker_id, offsets, exc)
                return
            self.offsets.committed(offsets)


class _CommitOnRevoke(ConsumerRebalanceListener):
    """Commit what is complete before a partition moves to another member, then forget it."""

    def __init__(self, service: WorkerService):
        self._service = service
        self._joined = GroupJoined(service.health, service.group_id)

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._service._commit()
        self._service.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("worker %s assigned %s", self._service.worker_id, sorted(map(str, assigned)))
        if not self._service.state.draining:
            await self._joined.on_partitions_assigned(assigned)
