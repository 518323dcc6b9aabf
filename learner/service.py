"""The learner service: telemetry in, nonsense out to the DLQ, online learning, signed snapshots out.

Poison isolation is per event: an event that does not validate (its size, the schema, impossible latencies,
bad features) or that the model fails to learn from goes to the DLQ with the reason and the exception's
type, and the others are learned; a dead letter the broker does not take is retried with backoff, the
batch uncommitted meanwhile (lodestar.faults).

Consumes `lodestar.telemetry` (group `learner.consumer_group`) and drives the shared, I/O-free
`learner.trainer.Learner` with each completed request's routed features and observed TTFT. Every N
events or T seconds (settings.learner) the learner's snapshot is published to Redis and announced
(lodestar.snapshot_store); then the learner's whole state is written as JSON to
`learner.checkpoint_path` (atomically) and only then are the consumed offsets committed, so a restart
resumes from the checkpoint and relearns exactly the events after it, and snapshot versions keep
increasing across restarts (also past a lost checkpoint: the stored version is the floor).

Observability: each batch is learned inside a `learn` span, a trace of its own LINKED to the trace of
every telemetry message in it (a batch has many requests, so no single parent); `self.metrics`
(lodestar.metrics.LearnerMetrics) counts events learned and rejected, snapshots published, and holds the
online prediction error (docs/observability.md). `self.health` (lodestar.health) is ready once the
learner (its checkpoint restored in the constructor) joined its consumer group.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from aiokafka import ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError
from opentelemetry import trace

from learner.trainer import Learner, LearnerConfig, make_learner
from lodestar import tracing
from lodestar.faults import Backoff, retry_transient
from lodestar.features import from_dict
from lodestar.health import GroupJoined, Health
from lodestar.kafka_admin import fixed_topic_partitions
from lodestar.kafka_io import DeadLetters, make_consumer, make_producer
from lodestar.lifecycle import service_lifecycle
from lodestar.limits import Limits
from lodestar.metrics import LearnerMetrics
from lodestar.names import RedisKeys, Topics
from lodestar.redis_io import make_redis
from lodestar.schemas import DeadLetter, InvalidMessage, TelemetryEvent
from lodestar.settings import Settings
from lodestar.snapshot import Snapshot
from lodestar.snapshot_keys import signing_key
from lodestar.snapshot_store import SnapshotStore, StaleSnapshotVersion

log = logging.getLogger(__name__)

SERVICE = "learner"
POLL_MS = 500
MAX_BATCH = 500
REPORT_EVERY_S = 30.0
DLQ_BACKOFF = Backoff(0.2, 5.0)


@dataclass(frozen=True, slots=True)
class Sample:
    """One learnable observation: the chosen worker's features as routed, and the TTFT seen."""

    features: np.ndarray
    ttft_ms: float


def validate_telemetry(raw: bytes | None, max_latency_ms: float, limits: Limits) -> Sample | None:
    """A learnable sample, None for valid telemetry with nothing to learn (a failed request),
    or InvalidMessage with the reason for nonsense (too large, unknown schema, impossible latencies, bad
    features)."""
    event = limits.decode(TelemetryEvent, raw)
    if event.status != "ok":
        return None
    if event.ttft_ms is None:
        raise InvalidMessage("invalid TelemetryEvent: status ok without ttft_ms")
    for name in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
        value = getattr(event, name)
        if value is not None and not (math.isfinite(value) and value <= max_latency_ms):
            raise InvalidMessage(f"invalid TelemetryEvent: {name}={value} is beyond max_latency_ms={max_latency_ms:g}")
    try:
        row = from_dict(event.decision.features)
    except KeyError as exc:
        raise InvalidMessage(f"invalid TelemetryEvent: decision.{exc.args[0]}") from None
    if not np.all(np.isfinite(row)) or np.any(row < 0):
        raise InvalidMessage("invalid TelemetryEvent: decision.features must be finite and non-negative")
    return Sample(row, float(event.ttft_ms))


def write_checkpoint(path: Path, state: dict) -> None:
    """Write `state` as JSON to `path` atomically (temp file in the same directory, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(state, f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_learner(path: Path, model: str, config: LearnerConfig) -> Learner:
    """The learner saved at `path` if it is of family `model`, else a fresh one continuing its version."""
    if not path.exists():
        return make_learner(model, config)
    state = json.loads(path.read_text())
    family = state.get("model", {}).get("family")
    if family == model:
        learner = Learner.restore(state)
        log.info("resumed %s learner from %s: %d events seen, snapshot v%d", model, path, learner.n_seen,
                 learner.version)
        return learner
    learner = make_learner(model, config)
    learner.version = int(state.get("counters", {}).get("version", 0))
    log.warning("checkpoint %s holds a %s model, not %s: starting afresh at snapshot v%d", path, family, model,
                learner.version)
    return learner


@dataclass(slots=True)
class LearnerStats:
    """Running totals of the service (the learner itself tracks its error)."""

    events: int = 0
    learned: int = 0
    not_learnable: int = 0
    dead_letters: int = 0
    snapshots: int = 0
    checkpoints: int = 0


class LearnerService:
    """One learner process. Construct inside a running event loop, then `await run(stop)`."""

    def __init__(self, settings: Settings, *, model: str | None = None, metrics: LearnerMetrics | None = None):
        self.settings = settings
        cfg = settings.learner
        self.model_name = model or cfg.model
        self.checkpoint_path = Path(cfg.checkpoint_path)
        self.learner = load_learner(self.checkpoint_path, self.model_name, LearnerConfig.from_settings(cfg))
        self.topics = Topics(settings.kafka.topic_prefix)
        self.redis = make_redis(settings)
        self.snapshots = SnapshotStore(self.redis, RedisKeys(settings.redis.key_prefix),
                                       signing_key=signing_key(settings))
        self.producer = make_producer(settings, client_id="learner")
        self.health = Health("group")
        self.limits = Limits(settings)
        self.dead_letters = DeadLetters(self.producer, self.topics, SERVICE, self.limits.max_message_bytes)
        self.consumer = make_consumer(settings, group_id=cfg.consumer_group, client_id="learner")
        self.consumer.subscribe([self.topics.telemetry], listener=GroupJoined(self.health, cfg.consumer_group))
        self.stats = LearnerStats()
        self.metrics = metrics if metrics is not None else LearnerMetrics()
        self.tracer = tracing.get_tracer(SERVICE)
        self._batch_size = min(MAX_BATCH, cfg.snapshot_every_events)
        self._uncommitted: dict[TopicPartition, int] = {}
        self._last_checkpoint = time.monotonic()

    @property
    def version(self) -> int:
        """The last snapshot version this learner produced (or resumed from)."""
        return self.learner.version

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Learn until `stop` is set; a clean stop checkpoints and commits what was learned."""
        stop = stop or asyncio.Event()
        async with service_lifecycle(self.settings, fixed_topic_partitions(self.settings), producer=self.producer,
                                     consumers=[self.consumer], closers=[self.redis.aclose]):
            stored = await self.snapshots.stored_version()
            if stored is not None and stored > self.learner.version:
                log.info("the stored snapshot is v%d: continuing from there", stored)
                self.learner.version = stored
            log.info("learner up: %s model, group %s, topic %s", self.model_name,
                     self.settings.learner.consumer_group, self.topics.telemetry)
            await self._consume(stop)
            if self._uncommitted:
                await self._checkpoint_and_commit()

    async def _consume(self, stop: asyncio.Event) -> None:
        next_report = time.monotonic() + REPORT_EVERY_S
        while not stop.is_set():
            # at most N events per batch, so the learner can reach its N-event cadence once per batch
            batch = await self.consumer.getmany(timeout_ms=POLL_MS, max_records=self._batch_size)
            records = [r for recs in batch.values() for r in recs]
            snapshot = await self.handle_records(records) if records else None
            snapshot = snapshot or self.learner.maybe_snapshot(time.time())
            checkpoint_due = time.monotonic() - self._last_checkpoint >= self.settings.learner.snapshot_every_s
            if snapshot is not None:
                await self._publish(snapshot)
                await self._checkpoint_and_commit()
            elif self._uncommitted and checkpoint_due:  # learning without a new snapshot yet
                await self._checkpoint_and_commit()
            if time.monotonic() >= next_report:
                self.report()
                next_report = time.monotonic() + REPORT_EVERY_S

    async def handle_records(self, records: list[ConsumerRecord]) -> Snapshot | None:
        """Validate a batch, dead-letter the nonsense, learn from the rest (off the event loop), all in one
        `learn` span linked to each record's trace; returns the snapshot the learner cut along the way, if
        one came due."""
        if not records:
            return None
        span = tracing.start_linked_span(self.tracer, tracing.OP_LEARN, records,
                                         group=self.settings.learner.consumer_group)
        with trace.use_span(span, end_on_exit=True):
            return await self._handle_records(records)

    async def _handle_records(self, records: list[ConsumerRecord]) -> Snapshot | None:
        samples: list[tuple[ConsumerRecord, Sample]] = []
        invalid: list[DeadLetter] = []
        max_latency = self.settings.learner.max_latency_ms
        for record in records:
            try:
                sample = validate_telemetry(record.value, max_latency, self.limits)
            except Exception as exc:  # whatever refuses an event is the event's own fault
                invalid.append(self.dead_letters.letter(record, "validate", exc))
                continue
            if sample is None:
                self.stats.not_learnable += 1
            else:
                samples.append((record, sample))
        await self._send_dead_letters(invalid, "invalid_telemetry")
        snapshot, failed = await asyncio.to_thread(self._learn, samples, time.time()) if samples else (None, [])
        await self._send_dead_letters([self.dead_letters.letter(r, "learn", exc) for r, exc in failed],
                                      "learn_failed")
        if snapshot is not None:
            trace.get_current_span().set_attribute(tracing.ATTR_MODEL_VERSION, snapshot.version)
        self.stats.events += len(records)
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            self._uncommitted[tp] = max(self._uncommitted.get(tp, 0), r.offset + 1)
        return snapshot

    async def _send_dead_letters(self, letters: list[DeadLetter], kind: str) -> None:
        """Dead-letter events, retried until the broker takes them (the batch stays uncommitted meanwhile)."""
        if not letters:
            return
        await retry_transient(lambda: self.dead_letters.send(letters), what="send dead letters", backoff=DLQ_BACKOFF)
        for _ in letters:
            self.metrics.record_rejected(kind)
        self.stats.dead_letters += len(letters)

    def _learn(self, samples: list[tuple[ConsumerRecord, Sample]], now_s: float
               ) -> tuple[Snapshot | None, list[tuple[ConsumerRecord, Exception]]]:
        """The one place learned events pass through (counted, and the online error refreshed). Checks the
        snapshot cadence after every event; keeps the newest snapshot if more than one came due. An event
        the model fails on is returned with its exception (for the DLQ); the others are learned."""
        snapshot = None
        failed: list[tuple[ConsumerRecord, Exception]] = []
        for record, s in samples:
            try:
                self.learner.observe(s.features, s.ttft_ms, now_s)
            except Exception as exc:  # this event's own failure: the others are learned
                failed.append((record, exc))
                continue
            snapshot = self.learner.maybe_snapshot(now_s) or snapshot
        learned = len(samples) - len(failed)
        self.stats.learned += learned
        self.metrics.events.inc(learned)
        error = self.learner.online_error()
        if error.get("samples"):
            self.metrics.record_online_error(error["mae_ms"], error["mape"])
        return snapshot, failed

    async def _publish(self, snapshot: Snapshot) -> None:
        try:
            await self.snapshots.publish(snapshot)
        except StaleSnapshotVersion as exc:
            log.error("%s; the next snapshot will follow v%d", exc, exc.stored)
            self.learner.version = exc.stored
            return
        self.stats.snapshots += 1
        self.metrics.snapshot_published(snapshot.version)
        holdout = snapshot.meta.get("holdout", {})
        log.info("published snapshot v%d (%s, validated=%s, held-out log-MAE %s) after %d events",
                 snapshot.version, snapshot.family, snapshot.validated, _fmt(holdout.get("log_mae")),
                 self.learner.n_seen)

    async def _checkpoint_and_commit(self) -> None:
        state = self.learner.checkpoint()
        await asyncio.to_thread(write_checkpoint, self.checkpoint_path, state)
        self.stats.checkpoints += 1
        self._last_checkpoint = time.monotonic()
        offsets, self._uncommitted = self._uncommitted, {}
        try:
            await self.consumer.commit(offsets)
        except (CommitFailedError, IllegalStateError) as exc:
            log.warning("offset commit failed after a rebalance (those events will be relearned): %s", exc)

    def report(self) -> dict[str, float]:
        """Log and return the online (prequential) prediction error and the service's counters."""
        err = self.learner.online_error()
        s = self.stats
        log.info("online error over %d predictions: MAPE %s, MAE %s ms, log-MAE %s; events %d, learned %d, "
                 "not learnable %d, dead letters %d, snapshots %d (now v%d)",
                 err.get("samples", 0), _fmt(err.get("mape")), _fmt(err.get("mae_ms")), _fmt(err.get("log_mae")),
                 s.events, s.learned, s.not_learnable, s.dead_letters, s.snapshots, self.learner.version)
        return err


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
