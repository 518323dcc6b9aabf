"""The async client library: submit requests to Lodestar and await their results.

    async with LodestarClient() as client:
        result = await client.generate(prompt="Hello", sampling=SamplingParams(max_new_tokens=32))

Requests go to `lodestar.requests`, keyed by session id (so a session's turns stay in order on one
partition and one dispatcher) or else by request id.

Results come back on a reply topic that this client reads with its own group-less consumer, from
the end of every partition as they were when the client started:
- by default the shared `lodestar.results` (requests carry no reply_to). Nothing to create or clean
  up, at the price of every client reading every result and ignoring the others' (fine for a CLI,
  tests, benchmarks and a handful of front ends);
- or a topic of the caller's (`reply_topic=`, e.g. `reply_topic_for("frontend-1")`), created if
  missing and set as every request's reply_to: each client reads only its own results.

Each request is published inside a `send` span (PRODUCER), the root of the request's trace, whose
context travels in the message's Kafka headers to the dispatcher and on to the worker. The span comes
from the process's global tracer provider (`lodestar.tracing.setup_tracing`, or the application's own);
with none installed it is a no-op and the dispatcher starts the trace.

Results are delivered at least once (a worker that dies between publishing and recording that it
did may publish again), so the client dedupes by request id: a request's future is resolved by the
first result and later copies are counted in `duplicate_results`, never returned. A request id is an
idempotency key: sending a request again with the same id (a retry after a timeout, say) within the
workers' dedupe window gets the stored result again, marked `replayed`, rather than a second generation.

A request without a `deadline_ms` gets one from the wait it is given (`timeout_s`): the client stops
waiting then, so Lodestar answers it with an `error` result instead of generating it if it has not
reached an engine by that time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from types import TracebackType

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaError
from opentelemetry import trace

from lodestar import tracing
from lodestar.kafka_admin import ensure_topics
from lodestar.kafka_io import make_consumer, make_producer
from lodestar.names import Topics
from lodestar.schemas import (
    EPOCH_MS_MAX,
    InferenceRequest,
    InferenceResult,
    InvalidMessage,
    SamplingParams,
    decode,
    now_ms,
)
from lodestar.settings import Settings, load_settings

log = logging.getLogger(__name__)

ANSWERED_MEMORY = 100_000  # request ids remembered after their result, to recognise late duplicates


def reply_topic_for(client_name: str, topics: Topics | None = None) -> str:
    """A per-client reply topic name under the Lodestar prefix."""
    return f"{(topics or Topics()).reply_prefix}{client_name}"


class LodestarClient:
    """Produces InferenceRequests and resolves each with its InferenceResult."""

    def __init__(self, settings: Settings | None = None, *, reply_topic: str | None = None):
        self.settings = settings or load_settings()
        self.topics = Topics(self.settings.kafka.topic_prefix)
        self.client_id = f"client-{uuid.uuid4().hex[:8]}"
        self._own_reply_topic = reply_topic
        self.reply_topic = reply_topic or self.topics.results
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[InferenceResult]] = {}
        self._answered: OrderedDict[str, None] = OrderedDict()
        self.duplicate_results = 0
        self.tracer = tracing.get_tracer("client")

    async def __aenter__(self) -> LodestarClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, and position the reply consumer at the end of its topic before anything is sent."""
        if self._own_reply_topic is not None:
            await ensure_topics(self.settings, {self._own_reply_topic: 1})
        self._producer = make_producer(self.settings, client_id=self.client_id)
        await self._producer.start()
        self._consumer = make_consumer(self.settings, group_id=None, client_id=self.client_id)
        await self._consumer.start()
        partitions = await self._reply_partitions(self._producer)
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the positions now, so no result produced after this is missed
            await self._consumer.position(tp)
        self._reader = asyncio.create_task(self._read_results())

    async def _reply_partitions(self, producer: AIOKafkaProducer) -> list[TopicPartition]:
        try:
            parts = await producer.partitions_for(self.reply_topic)  # waits for the topic's metadata
        except KafkaError as exc:
            raise RuntimeError(
                f"reply topic {self.reply_topic!r} is not available (run `lodestar topics create`): {exc!r}"
            ) from exc
        return [TopicPartition(self.reply_topic, p) for p in sorted(parts)]

    async def close(self) -> None:
        """Stop reading results and disconnect; requests still waiting fail with CancelledError."""
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for fut in self._pending.values():
            fut.cancel()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    async def generate(
        self,
        prompt: str | None = None,
        input_ids: list[int] | None = None,
        sampling: SamplingParams | None = None,
        session_id: str | None = None,
        timeout_s: float = 120.0,
    ) -> InferenceResult:
        """Submit one prompt (text or token ids) and wait for its result; TimeoutError after timeout_s."""
        request = InferenceRequest(
            prompt=prompt,
            input_ids=input_ids,
            sampling=sampling or SamplingParams(),
            session_id=session_id,
        )
        return await self.request(request, timeout_s=timeout_s)

    async def request(self, request: InferenceRequest, timeout_s: float = 120.0) -> InferenceResult:
        """Submit a prepared request and wait for its result; TimeoutError after timeout_s."""
        if self._producer is None:
            raise RuntimeError("LodestarClient is not started (use `async with LodestarClient() as client`)")
        if self._own_reply_topic is not None and request.reply_to is None:
            request = request.model_copy(update={"reply_to": self._own_reply_topic})
        if request.deadline_ms is None:  # nobody waits for an answer after timeout_s: do not generate it then
            request = request.model_copy(update={"deadline_ms": min(now_ms() + timeout_s * 1000.0, EPOCH_MS_MAX)})
        rid = request.request_id
        if rid in self._pending:
            raise ValueError(f"request {rid} is already waiting for its result")
        fut: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            async with asyncio.timeout(timeout_s):
                key = (request.session_id or rid).encode()
                span = tracing.start_send_span(self.tracer, self.topics.requests, request_id=rid, key=key.decode())
                with trace.use_span(span, end_on_exit=True):
                    await self._producer.send_and_wait(self.topics.requests, request.to_bytes(), key=key,
                                                       headers=tracing.inject_headers())
                return await fut
        finally:
            self._pending.pop(rid, None)

    async def submit_many(
        self,
        requests: Sequence[InferenceRequest],
        *,
        timeout_s: float = 300.0,
        rate_per_s: float | None = None,
    ) -> list[InferenceResult | None]:
        """Submit many requests at once (or paced at rate_per_s); results in input order, None if timed out."""
        start = time.monotonic()

        async def one(i: int, request: InferenceRequest) -> InferenceResult | None:
            if rate_per_s:
                await asyncio.sleep(max(start + i / rate_per_s - time.monotonic(), 0.0))
            try:
                return await self.request(request, timeout_s=timeout_s)
            except TimeoutError:
                return None

        return list(await asyncio.gather(*(one(i, r) for i, r in enumerate(requests))))

    async def _read_results(self) -> None:
        assert self._consumer is not None
        while True:
            try:
                batches = await self._consumer.getmany(timeout_ms=500)
            except KafkaError as exc:  # keep reading through broker hiccups
                log.warning("result consumer error: %r", exc)
                await asyncio.sleep(0.5)
                continue
            for records in batches.values():
                for record in records:
                    self._accept(record.value)

    def _accept(self, raw: bytes | None) -> None:
        if not raw:
            return
        try:
            result = decode(InferenceResult, raw)
        except InvalidMessage as exc:
            log.warning("ignoring an unreadable result: %s", exc.reason)
            return
        rid = result.request_id
        fut = self._pending.get(rid)
        if fut is None or fut.done():  # answered already, another client's request, or one that timed out here
            if rid in self._answered:
                self.duplicate_results += 1
            return
        fut.set_result(result)  # a request sent again with an answered id waits for its (replayed) answer
        self._answered[rid] = None
        if len(self._answered) > ANSWERED_MEMORY:
            self._answered.popitem(last=False)
