"""The worker's streaming path: a request that asks for a stream (`stream`), or one served through an engine API
(`api`, `messages`), has its engine stream forwarded to its reply topic as StreamChunks before its result.

One serving of a request publishes its chunks under a fresh `serve_id`, numbered from 0, keyed by the request
id (so they share a partition, in order, with the result that follows them on the same producer). Sends are
not awaited one by one: the producer keeps them in order and `ChunkPublisher.flush` awaits every
acknowledgement before the outcome is stored and the result published, so a result is never ahead of its
chunks. A chunk's `data` longer than MAX_CHUNK_DATA_CHARS is split across chunks (`more`).

What a chunk carries (lodestar/schemas.py StreamChunk): for a request without `api`, the text generated since
the previous chunk (`text`); with `api` and `stream`, the engine's events' JSON as the engine sent it
(`data`: one event, or several newline-separated when they came while the previous chunk was unacknowledged,
see ChunkPublisher); with `api` and no stream, one chunk (or its fragments) holding the response the engine
answers without streaming, built from the stream (workers/engine_api.py), so the worker still times the first
token.

An engine that fails after output has been forwarded is not retried (the client already holds part of an
answer): the result reports the error.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner

from lodestar.kafka_io import Headers
from lodestar.schemas import MAX_CHUNK_DATA_CHARS, InferenceRequest, StreamChunk, now_ms
from workers.engine_api import StreamCollector, engine_call
from workers.sglang_client import Generation, SGLangClient, StreamMeter


class ChunksUndelivered(Exception):
    """The broker did not take a chunk of a stream (`cause`): its readers see a gap, the request is answered
    as an error."""

    def __init__(self, cause: BaseException):
        super().__init__(f"stream chunks not delivered: {cause!r}")
        self.cause = cause


class ChunkPublisher:
    """Publishes one serving's StreamChunks in order, acknowledged together by `flush`.

    A chunk goes out as soon as its output arrives, unless the previous chunk of this stream is not yet
    acknowledged by the broker: then what arrives meanwhile waits for that acknowledgement and goes out as one
    chunk (text joined; engine events newline-separated in `data`). On an idle host an acknowledgement takes a
    millisecond or two and events come every few milliseconds, so each event is its own chunk; on a busy one
    the stream needs fewer messages, and so less CPU, exactly when there is less of it."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, request_id: str, worker_id: str, headers: Headers):
        self._producer = producer
        self._topic = topic
        self._key = request_id.encode()
        self._headers = headers
        self.request_id = request_id
        self.worker_id = worker_id
        self.serve_id = uuid.uuid4().hex
        self.seq = 0
        self._partition: int | None = None
        self._acks: list[asyncio.Future[object]] = []
        self._texts: list[str] = []
        self._events: list[str] = []
        self._tokens = 0
        self._later: asyncio.Task[None] | None = None

    async def _send(self, *, text: str = "", data: str = "", more: bool = False, completion_tokens: int = 0) -> None:
        if self._partition is None:  # the result's partition (same key, same partitioner), computed once
            partitions = sorted(await self._producer.partitions_for(self._topic))
            self._partition = DefaultPartitioner()(self._key, partitions, partitions)
        # built from this worker's own values, within the bounds (fragments): not validated again per chunk
        chunk = StreamChunk.model_construct(request_id=self.request_id, worker_id=self.worker_id,
                                            serve_id=self.serve_id, seq=self.seq, text=text, data=data, more=more,
                                            completion_tokens=completion_tokens, sent_at=now_ms())
        self.seq += 1
        self._acks.append(await self._producer.send(self._topic, chunk.to_bytes(), key=self._key,
                                                    partition=self._partition, headers=self._headers))

    async def _send_waiting(self) -> None:
        """Send what waits: the joined text, or the events newline-separated (fragments when long)."""
        step = MAX_CHUNK_DATA_CHARS
        if self._texts:
            text, self._texts = "".join(self._texts), []
            for i in range(0, len(text), step):
                await self._send(text=text[i:i + step], completion_tokens=self._tokens)
        if self._events:
            raw, self._events = "\n".join(self._events), []
            for i in range(0, max(len(raw), 1), step):
                await self._send(data=raw[i:i + step], more=i + step < len(raw))

    async def _offer(self) -> None:
        if self._later is not None and not self._later.done():
            return  # the waiting send picks this up
        if self._acks and not self._acks[-1].done():
            self._later = asyncio.ensure_future(self._after_ack())
            return
        await self._send_waiting()

    async def _after_ack(self) -> None:
        while self._texts or self._events:
            await asyncio.wait([self._acks[-1]])
            await self._send_waiting()

    async def text(self, delta: str, completion_tokens: int) -> None:
        """New text (a plain request's stream)."""
        self._texts.append(delta)
        self._tokens = completion_tokens
        await self._offer()

    async def data(self, raw: str) -> None:
        """One engine event (its JSON text, one line) or the whole response body."""
        self._events.append(raw)
        await self._offer()

    async def flush(self) -> None:
        """Send what waits, then wait until the broker has acknowledged every chunk (raises the first send's
        error)."""
        if self._later is not None:
            await self._later
        await self._send_waiting()
        acks, self._acks = self._acks, []
        if acks:
            await asyncio.gather(*acks)


async def serve_streamed(engine: SGLangClient, request: InferenceRequest, chunks: ChunkPublisher,
                         meter: StreamMeter) -> Generation:
    """Serve `request` on the engine's API, forwarding its stream to `chunks` (see the module doc); raises
    EngineError as SGLangClient does. The caller flushes `chunks`."""
    call = engine_call(request)
    collector = StreamCollector(request.engine_api, request.api.n if request.api else 1)
    events = request.api is not None
    sent = ""
    async for raw, event in engine.stream_events(call.path, call.body, meter):
        meter.tick(collector.observe(event))
        if not request.stream:
            continue
        if events:
            await chunks.data(raw)
            continue
        text = collector.text
        delta = text[len(sent):] if text.startswith(sent) else text
        if delta:
            await chunks.text(delta, collector.completion_tokens)
            sent = text
    if events and not request.stream:
        await chunks.data(json.dumps(collector.body(), separators=(",", ":"), ensure_ascii=False))
    return meter.result(collector.text, {
        "prompt_tokens": collector.prompt_tokens, "cached_tokens": collector.cached_tokens,
        "completion_tokens": collector.completion_tokens, "finish_reason": collector.finish_reason,
    })
