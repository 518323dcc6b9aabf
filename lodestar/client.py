"""The async client library: submit requests to Lodestar and await their results, or stream them.

    async with LodestarClient() as client:
        result = await client.generate(prompt="Hello", sampling=SamplingParams(max_new_tokens=32))
        async with client.stream(InferenceRequest(prompt="Hello")) as reply:
            async for text in reply:          # the text as the engine produces it
                print(text, end="")
        print(reply.result.completion_tokens)

Requests go to `lodestar.requests`, keyed by session id (so a session's turns stay in order on one
partition and one dispatcher) or else by request id.

Results come back on a reply topic that this client reads with its own group-less consumer, from
the end of every partition as they were when the client started:
- by default the shared `lodestar.results` (requests carry no reply_to). Nothing to create or clean
  up, at the price of every client reading every result and ignoring the others' (fine for a CLI,
  tests, benchmarks and a handful of front ends);
- or a topic of the caller's (`reply_topic=`, e.g. `reply_topic_for("frontend-1")`), created if
  missing and set as every request's reply_to: each client reads only its own results. The gateway
  (gateway/) is such a client, on `<prefix>reply.<gateway id>`.

A streamed request (`stream: true`) gets StreamChunks on the same topic before its result; `Reply` puts
them back in order (lodestar/streams.py: repeats dropped, fragments joined, a mid-stream takeover
interrupts the stream with StreamInterrupted) and hands on each piece: the new text of a plain request,
or one engine event's JSON for a request with `api` (a chunk holding several is split); `Reply.batches()`
hands on everything that has arrived at once. `Reply.collect()` waits for the whole answer instead, and there
a takeover is silent: the last serving's output is what it returns.

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

A service embedding the client (the gateway) runs it inside its own lifecycle: `connect()` builds the
producer and the reply consumer, the service starts them (lodestar/lifecycle.py), then `attach()` positions
the consumer and `read_replies()` runs as one of its background tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
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
    StreamChunk,
    now_ms,
)
from lodestar.settings import Settings, load_settings
from lodestar.streams import ChunkAssembler, StreamInterrupted, decode_reply

log = logging.getLogger(__name__)

ANSWERED_MEMORY = 100_000  # request ids remembered after their result, to recognise late duplicates
MAX_REPLY_CHARS = 64 * 1024 * 1024  # output held for one reply (a stream not read, or a collected answer)


def with_deadline(request: InferenceRequest, timeout_s: float) -> InferenceRequest:
    """`request` with a `deadline_ms` when it has none: nobody waits for its answer after `timeout_s`, so it is
    not to be generated after then."""
    if request.deadline_ms is not None:
        return request
    return request.model_copy(update={"deadline_ms": min(now_ms() + timeout_s * 1000.0, EPOCH_MS_MAX)})


def reply_topic_for(client_name: str, topics: Topics | None = None) -> str:
    """A per-client reply topic name under the Lodestar prefix."""
    return (topics or Topics()).reply(client_name)


class Reply:
    """What comes back for one sent request: its streamed pieces (when it streams) and its one result.

    Iterate it for the pieces as they come (ends after the result; StreamInterrupted if the stream cannot be
    continued), or `await collect()` for the last serving's pieces and the result, or `await result()` alone.
    """

    def __init__(self, request_id: str, max_chars: int = MAX_REPLY_CHARS):
        self.request_id = request_id
        self._max_chars = max_chars
        self._assembler = ChunkAssembler()
        self._streaming = False
        self._queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()
        self._pieces: list[str] = []  # collect(): the current serving's
        self._held = 0
        self._done: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
        self.result_or_none: InferenceResult | None = None
        self.first_piece_at: float | None = None  # perf_counter of the first piece
        self.worker_id = ""  # the worker serving it, as its latest chunk or its result says

    @property
    def result(self) -> InferenceResult:
        """The result, once the reply is complete."""
        if self.result_or_none is None:
            raise RuntimeError(f"request {self.request_id} has no result yet")
        return self.result_or_none

    @property
    def done(self) -> bool:
        """The reply is over: its result came, or it failed (interrupted, too long, cancelled)."""
        return self._done.done()

    @property
    def answered(self) -> bool:
        """The request's result came (whatever its status): the pipeline is done with it."""
        return self.result_or_none is not None

    @property
    def restarts(self) -> int:
        """How many times a new serving replaced one whose output had not been delivered."""
        return self._assembler.restarts

    def _fail(self, exc: BaseException) -> None:
        if not self._done.done():
            self._done.set_exception(exc)
            self._done.exception()  # retrieved here: a reader that stopped listening must not warn
            self._queue.put_nowait(exc)

    def _chunk(self, chunk: StreamChunk) -> None:
        if self._done.done():
            return
        self.worker_id = chunk.worker_id
        serve = self._assembler.serve_id
        try:
            piece = self._assembler.accept(chunk)
        except StreamInterrupted as exc:
            self._fail(exc)
            return
        if self._assembler.serve_id != serve:
            self._pieces, self._held = [], 0
        if piece is None:
            return
        self._held += len(piece)
        if self._held > self._max_chars:
            self._fail(StreamInterrupted(f"the reply is longer than {self._max_chars} characters"))
            return
        if self.first_piece_at is None:
            self.first_piece_at = time.perf_counter()
        pieces = piece.split("\n") if chunk.data else [piece]  # events a worker sent together
        if self._streaming:
            self._assembler.delivered = True
            for one in pieces:
                self._queue.put_nowait(one)
        else:
            self._pieces.extend(pieces)

    def _result(self, result: InferenceResult) -> None:
        if self._done.done():
            return
        self.worker_id = result.worker_id or self.worker_id
        self.result_or_none = result
        self._done.set_result(result)
        self._queue.put_nowait(None)

    async def result_only(self) -> InferenceResult:
        """Wait for the result (pieces are kept for `collect`, not waited for)."""
        return await asyncio.shield(self._done)

    async def collect(self) -> tuple[list[str], InferenceResult]:
        """Wait for the result; returns it with the pieces of the serving that produced it."""
        result = await asyncio.shield(self._done)
        return list(self._pieces), result

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[str]:
        async for batch in self.batches():
            for piece in batch:
                yield piece

    async def batches(self) -> AsyncIterator[list[str]]:
        """The pieces as they come, each time all that has arrived (a writer can send them at once)."""
        self._streaming = True
        if self._pieces:  # anything that arrived before iteration began
            self._assembler.delivered = True
            yield self._pieces
        self._pieces = []
        while True:
            batch: list[str] = []
            item = await self._queue.get()
            while True:
                if item is None or isinstance(item, BaseException):
                    if batch:
                        yield batch
                    if item is None:
                        return
                    raise item
                batch.append(item)
                if self._queue.empty():
                    break
                item = self._queue.get_nowait()
            yield batch


class LodestarClient:
    """Produces InferenceRequests and resolves each with its InferenceResult (and its stream, if it has one)."""

    def __init__(self, settings: Settings | None = None, *, reply_topic: str | None = None,
                 client_id: str | None = None):
        self.settings = settings or load_settings()
        self.topics = Topics(self.settings.kafka.topic_prefix)
        self.client_id = client_id or f"client-{uuid.uuid4().hex[:8]}"
        self._own_reply_topic = reply_topic
        self.reply_topic = reply_topic or self.topics.results
        self._producer: AIOKafkaProducer | None = None
        self._consumer: AIOKafkaConsumer | None = None
        self._reader: asyncio.Task[None] | None = None
        self._replies: dict[str, Reply] = {}
        self._answered: OrderedDict[str, None] = OrderedDict()
        self.duplicate_results = 0
        self.duplicate_chunks = 0
        self.orphan_replies = 0  # replies to requests not followed here (another client's, or abandoned)
        self.tracer = tracing.get_tracer("client")

    async def __aenter__(self) -> LodestarClient:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- lifecycle -------------------------------------------------------------------------------

    def connect(self) -> tuple[AIOKafkaProducer, AIOKafkaConsumer]:
        """Build the producer and the reply consumer (not started)."""
        self._producer = make_producer(self.settings, client_id=self.client_id)
        self._consumer = make_consumer(self.settings, group_id=None, client_id=self.client_id)
        return self._producer, self._consumer

    async def attach(self) -> None:
        """With both clients started: position the reply consumer at the end of its topic, so no reply
        produced from now on is missed."""
        assert self._producer is not None and self._consumer is not None
        partitions = await self._reply_partitions(self._producer)
        self._consumer.assign(partitions)
        await self._consumer.seek_to_end(*partitions)
        for tp in partitions:  # resolve the positions now, so no result produced after this is missed
            await self._consumer.position(tp)

    async def start(self) -> None:
        """Connect, and position the reply consumer at the end of its topic before anything is sent."""
        if self._own_reply_topic is not None:
            await ensure_topics(self.settings, {self._own_reply_topic: 1})
        producer, consumer = self.connect()
        await producer.start()
        await consumer.start()
        await self.attach()
        self._reader = asyncio.create_task(self.read_replies())

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
        self.cancel_all()
        if self._consumer is not None:
            await self._consumer.stop()
        if self._producer is not None:
            await self._producer.stop()

    def cancel_all(self) -> None:
        """Fail every reply still waiting (CancelledError)."""
        for reply in list(self._replies.values()):
            reply._fail(asyncio.CancelledError())
        self._replies.clear()

    # ---- sending ---------------------------------------------------------------------------------

    async def send(self, request: InferenceRequest, max_reply_chars: int = MAX_REPLY_CHARS) -> Reply:
        """Publish a prepared request (with this client's reply topic) and return its Reply; call `forget`
        when no longer interested."""
        if self._producer is None:
            raise RuntimeError("LodestarClient is not started (use `async with LodestarClient() as client`)")
        if self._own_reply_topic is not None and request.reply_to is None:
            request = request.model_copy(update={"reply_to": self._own_reply_topic})
        rid = request.request_id
        if rid in self._replies:
            raise ValueError(f"request {rid} is already waiting for its result")
        reply = Reply(rid, max_reply_chars)
        self._replies[rid] = reply
        try:
            key = (request.session_id or rid).encode()
            span = tracing.start_send_span(self.tracer, self.topics.requests, request_id=rid, key=key.decode())
            with trace.use_span(span, end_on_exit=True):
                await self._producer.send_and_wait(self.topics.requests, request.to_bytes(), key=key,
                                                   headers=tracing.inject_headers())
        except BaseException:
            self.forget(rid)
            raise
        return reply

    def forget(self, request_id: str) -> None:
        """Stop following a request: later replies to it are ignored."""
        self._replies.pop(request_id, None)

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
        async with asyncio.timeout(timeout_s):
            reply = await self.send(with_deadline(request, timeout_s))
            try:
                return await reply.result_only()
            finally:
                self.forget(request.request_id)

    @contextlib.asynccontextmanager
    async def stream(self, request: InferenceRequest, timeout_s: float = 120.0) -> AsyncIterator[Reply]:
        """Submit `request` as a stream and yield its Reply to iterate; TimeoutError after timeout_s."""
        async with asyncio.timeout(timeout_s):
            reply = await self.send(with_deadline(request, timeout_s).model_copy(update={"stream": True}))
            try:
                yield reply
            finally:
                self.forget(request.request_id)

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

    # ---- reading ---------------------------------------------------------------------------------

    async def read_replies(self) -> None:
        """Read the reply topic until cancelled, handing each message to its request's Reply."""
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
            message = decode_reply(raw)
        except InvalidMessage as exc:
            log.warning("ignoring an unreadable reply: %s", exc.reason)
            return
        rid = message.request_id
        if isinstance(message, StreamChunk):
            reply = self._replies.get(rid)
            if reply is None:
                self.orphan_replies += 1
                return
            duplicates = reply._assembler.duplicates
            reply._chunk(message)
            self.duplicate_chunks += reply._assembler.duplicates - duplicates
            return
        reply = self._replies.get(rid)
        if reply is None or reply.done:  # answered already, another client's request, or one that timed out here
            if rid in self._answered:
                self.duplicate_results += 1
            elif reply is None:
                self.orphan_replies += 1
            return
        reply._result(message)  # a request sent again with an answered id waits for its (replayed) answer
        self._answered[rid] = None
        if len(self._answered) > ANSWERED_MEMORY:
            self._answered.popitem(last=False)
