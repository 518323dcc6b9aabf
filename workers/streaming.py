"""The worker's streaming path: a request that asks for a stream (`stream`), or one served through an engine API
(`api`, `messages`), has its engine stream forwarded to its reply topic as StreamChunks before its result.

One serving of a request publishes its chunks under a fresh `serve_id`, numbered from 0, keyed by the request
id (so they share a partition, in order, with the result that follows them on the same producer). Sends are
not awaited one by one: the producer keeps them in order and `ChunkPublisher.flush` awaits every
acknowledgement before the outcome is stored and the result published, so a result is never ahead of its
chunks. A chunk's `data` longer than MAX_CHUNK_DATA_CHARS is split across chunks (`more`).

What a chunk carries (lodestar/schemas.py StreamChunk): for a request without `api`, the text generated since
the previous chunk (`text`); with `api` and `stream`, each engine event's JSON as the engine sent it (`data`);
with `api` and no stream, one chunk (or its fragments) holding the response the engine answers without
streaming, built from the stream (workers/engine_api.py), so the worker still times the first token.

An engine that fails after output has been forwarded is not retried (the client already holds part of an
answer): the result reports the error.
"""

from __future__ import annotations

import asyncio
import json
import uuid

from aiokafka import AIOKafkaProducer

from lodestar.kafka_io import Headers
from lodestar.schemas import MAX_CHUNK_DATA_CHARS, InferenceRequest, StreamChunk
from workers.engine_api import StreamCollector, engine_call
from workers.sglang_client import Generation, SGLangClient, StreamMeter


class ChunkPublisher:
    """Publishes one serving's StreamChunks in order, acknowledged together by `flush`."""

    def __init__(self, producer: AIOKafkaProducer, topic: str, request_id: str, worker_id: str, headers: Headers):
        self._producer = producer
        self._topic = topic
        self._key = request_id.encode()
        self._headers = headers
        self.request_id = request_id
        self.worker_id = worker_id
        self.serve_id = uuid.uuid4().hex
        self.seq = 0
        self._acks: list[asyncio.Future[object]] = []

    async def _send(self, *, text: str = "", data: str = "", more: bool = False, completion_tokens: int = 0) -> None:
        chunk = StreamChunk(request_id=self.request_id, worker_id=self.worker_id, serve_id=self.serve_id,
                            seq=self.seq, text=text, data=data, more=more, completion_tokens=completion_tokens)
        self.seq += 1
        self._acks.append(await self._producer.send(self._topic, chunk.to_bytes(), key=self._key,
                                                    headers=self._headers))

    async def text(self, delta: str, completion_tokens: int) -> None:
        """New text (in pieces of at most MAX_CHUNK_DATA_CHARS)."""
        for i in range(0, len(delta), MAX_CHUNK_DATA_CHARS):
            await self._send(text=delta[i:i + MAX_CHUNK_DATA_CHARS], completion_tokens=completion_tokens)

    async def data(self, raw: str) -> None:
        """One engine event or response body, split into fragments when long."""
        step = MAX_CHUNK_DATA_CHARS
        for i in range(0, max(len(raw), 1), step):
            await self._send(data=raw[i:i + step], more=i + step < len(raw))

    async def flush(self) -> None:
        """Wait until the broker has acknowledged every chunk sent (raises the first send's error)."""
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
