"""Driving a timed request stream through the client and tallying what comes back.

`drive` submits each request at its arrival time (relative to the start of the run) and records its
one result in a `PhaseTally`; a `TelemetryWatch` reads the telemetry topic alongside and hands each
event's routing decision (policy, model version, dispatcher) to the tally of the request it belongs to.
The tally answers what a live view and the final report need: counts, TTFT summaries and load shares.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError

from lodestar.client import LodestarClient
from lodestar.kafka_io import make_admin, make_consumer
from lodestar.names import Topics
from lodestar.schemas import InferenceRequest, InferenceResult, InvalidMessage, TelemetryEvent, decode, now_ms
from lodestar.settings import Settings

ROLLING_WINDOW = 100


@dataclass(frozen=True, slots=True)
class TimedRequest:
    """A request and when to send it, in seconds after the start of its run."""

    at_s: float
    request: InferenceRequest


@dataclass(frozen=True, slots=True)
class TTFTSummary:
    """TTFT statistics of a set of requests (ms); `errors` counts the requests that did not succeed."""

    count: int
    errors: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


def summarize_ttft(ttfts_ms: Sequence[float], errors: int = 0) -> TTFTSummary:
    """Mean and percentiles (linear interpolation, as numpy) of successful requests' TTFTs."""
    if not ttfts_ms:
        return TTFTSummary(0, errors, None, None, None, None)
    a = np.asarray(ttfts_ms, dtype=float)
    p50, p90, p99 = (float(v) for v in np.percentile(a, [50, 90, 99]))
    return TTFTSummary(len(a), errors, float(a.mean()), p50, p90, p99)


@dataclass
class PhaseTally:
    """Everything observed about the requests of one phase."""

    name: str
    gpu_of: Mapping[str, str] = field(default_factory=dict)  # worker id -> GPU type
    sent: list[str] = field(default_factory=list)
    results: dict[str, InferenceResult] = field(default_factory=dict)
    unanswered: list[str] = field(default_factory=list)  # timed out waiting for a result
    decisions: dict[str, TelemetryEvent] = field(default_factory=dict)
    started_at: float = field(default_factory=time.monotonic)
    _recent_ttft: deque[float] = field(default_factory=lambda: deque(maxlen=ROLLING_WINDOW))

    def add_result(self, result: InferenceResult) -> None:
        self.results[result.request_id] = result
        if result.status == "ok" and result.ttft_ms is not None:
            self._recent_ttft.append(result.ttft_ms)

    def add_event(self, event: TelemetryEvent) -> None:
        self.decisions.setdefault(event.request_id, event)

    @property
    def completed(self) -> int:
        return len(self.results)

    @property
    def errors(self) -> int:
        """Results that are not `ok`, plus requests that got no result in time."""
        return sum(r.status != "ok" for r in self.results.values()) + len(self.unanswered)

    @property
    def in_flight(self) -> int:
        return len(self.sent) - len(self.results) - len(self.unanswered)

    def ttft(self) -> TTFTSummary:
        ok = [r.ttft_ms for r in self.results.values() if r.status == "ok" and r.ttft_ms is not None]
        return summarize_ttft(ok, self.errors)

    def rolling_ttft(self) -> TTFTSummary:
        """Over the last ROLLING_WINDOW successful results."""
        return summarize_ttft(list(self._recent_ttft))

    def worker_counts(self) -> Counter[str]:
        """Results per worker id."""
        return Counter(r.worker_id for r in self.results.values() if r.worker_id)

    def gpu_shares(self) -> dict[str, float]:
        """Fraction of the phase's answered requests served by each GPU type."""
        counts: Counter[str] = Counter()
        for worker_id, n in self.worker_counts().items():
            counts[self.gpu_of.get(worker_id, worker_id)] += n
        total = sum(counts.values())
        return {gpu: n / total for gpu, n in sorted(counts.items())} if total else {}

    def policy_counts(self) -> Counter[str]:
        """Decisions by the policy that made them (`learned`, or `learned/<fallback>`), `+explore` marked."""
        return Counter(e.decision.policy + ("+explore" if e.decision.explored else "")
                       for e in self.decisions.values())

    def dispatcher_counts(self) -> Counter[str]:
        return Counter(e.decision.dispatcher_id for e in self.decisions.values())

    def model_versions(self) -> Counter[int]:
        return Counter(e.decision.model_version for e in self.decisions.values())


async def drive(
    client: LodestarClient,
    stream: Iterable[TimedRequest],
    tally: PhaseTally,
    timeout_s: float,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Send each request at its time, wait for every result (or `timeout_s` after its send).

    `on_tick` is called after each send and each result (e.g. to refresh a live view)."""
    start = time.monotonic()
    tally.started_at = start

    async def one(request: InferenceRequest) -> None:
        try:
            result = await client.request(request, timeout_s=timeout_s)
        except TimeoutError:
            tally.unanswered.append(request.request_id)
        else:
            tally.add_result(result)
        if on_tick:
            on_tick()

    tasks: list[asyncio.Task[None]] = []
    try:
        for timed in stream:
            delay = start + timed.at_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            request = timed.request.model_copy(update={"created_at": now_ms()})
            tally.sent.append(request.request_id)
            tasks.append(asyncio.create_task(one(request)))
            if on_tick:
                on_tick()
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class TelemetryWatch:
    """Reads the telemetry topic from its end (as of `start`) and routes each event to a tally."""

    def __init__(self, settings: Settings):
        self.topic = Topics(settings.kafka.topic_prefix).telemetry
        self._settings = settings
        self._consumer = make_consumer(settings, group_id=None, client_id="lodestar-up-telemetry")
        self._tallies: dict[str, PhaseTally] = {}
        self._task: asyncio.Task[None] | None = None

    def follow(self, request_ids: Iterable[str], tally: PhaseTally) -> None:
        """Send the telemetry of these requests to `tally`."""
        for rid in request_ids:
            self._tallies[rid] = tally

    async def start(self) -> None:
        partitions = [TopicPartition(self.topic, p) for p in await self._partitions()]
        if not partitions:
            raise RuntimeError(f"topic {self.topic} does not exist (create the topics first)")
        await self._consumer.start()
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:
            await self._consumer.position(tp)
        self._task = asyncio.create_task(self._read())

    async def _partitions(self) -> list[int]:
        admin = make_admin(self._settings, client_id="lodestar-up-telemetry")
        await admin.start()
        try:
            (described,) = await admin.describe_topics([self.topic])
        finally:
            await admin.close()
        return sorted(p["partition"] for p in described["partitions"])

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except KafkaError:
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    try:
                        event = decode(TelemetryEvent, record.value or b"")
                    except InvalidMessage:
                        continue  # the learner dead-letters it; nothing to show here
                    tally = self._tallies.get(event.request_id)
                    if tally is not None:
                        tally.add_event(event)
