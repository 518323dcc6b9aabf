"""A worker service on fakes (no broker, no Redis, no engine process) for unit tests: an SGLang client whose
/generate answers by prompt, a request ledger in memory, and a producer that keeps what it would publish."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import httpx
from aiokafka import ConsumerRecord
from redis.exceptions import OutOfMemoryError

from lodestar.schemas import InferenceRequest, RoutedRequest, RoutingDecision
from workers.dedupe import Claim, CompletedRequest
from workers.sglang_client import RetryPolicy, SGLangClient

TOPIC = "lodestar.worker.w1"


def sse(*events: dict[str, Any]) -> bytes:
    return ("".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n").encode()


def chunk(text: str, completion: int, finish: str | None = None) -> dict[str, Any]:
    return {"text": text, "meta_info": {"prompt_tokens": 12, "completion_tokens": completion, "cached_tokens": 5,
                                        "finish_reason": {"type": finish} if finish else None}}


def engine(answer: Callable[[str], httpx.Response], calls: list[dict[str, Any]] | None = None) -> SGLangClient:
    """An SGLang client whose /generate answers `answer(prompt)`; each request body is appended to `calls`."""
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        if calls is not None:
            calls.append(body)
        return answer(body["text"])

    return SGLangClient("http://engine", request_timeout_s=5, retry=RetryPolicy(attempts=1, backoff_s=0.0),
                        transport=httpx.MockTransport(handle))


def by_prompt(prompt: str) -> httpx.Response:
    if prompt == "refused":
        return httpx.Response(400, json={"object": "error", "message": "prompt too long", "code": 400})
    if prompt == "busy":
        return httpx.Response(503, text="server busy")
    if prompt.startswith("long:"):  # an answer of that many characters
        text = "y" * int(prompt.removeprefix("long:"))
        return httpx.Response(200, content=sse(chunk(text, 2, "length")), headers={"content-type": "text/event-stream"})
    return httpx.Response(200, content=sse(chunk("Hel", 1), chunk("Hello", 2), chunk("Hello!", 3, "stop")),
                          headers={"content-type": "text/event-stream"})


class FakeLedger:
    """Request ids in memory, with RequestLedger's outcomes: a done id comes back with its origin, digest and
    stored outcome. `oom` makes every write fail as a Redis at maxmemory would."""

    def __init__(self) -> None:
        self.done: dict[str, tuple[str, str]] = {}
        self.stored: dict[str, CompletedRequest] = {}
        self.oom = False

    async def claim(self, request_id: str) -> Claim:
        stored = self.stored.get(request_id)
        if request_id in self.done:
            origin, digest = self.done[request_id]
            return Claim("done", stored=stored, origin=origin, digest=digest)
        return Claim("claimed", stored=stored)

    async def store(self, completed: CompletedRequest) -> None:
        if self.oom:
            raise OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'.")
        self.stored[completed.result.request_id] = completed

    async def mark_done(self, request_id: str, origin: str, digest: str) -> None:
        if self.oom:
            raise OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'.")
        self.done[request_id] = (origin, digest)

    async def renew(self, request_ids: list[str]) -> int:
        return len(request_ids)

    async def release(self, request_id: str) -> None:
        return None


class FakeProducer:
    """Keeps what would have been published: (topic, value, headers). A topic in `refuse` fails with its
    exception (once, if `refuse_once`)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, list[tuple[str, bytes]]]] = []
        self.refuse: dict[str, Exception] = {}
        self.refuse_once = False

    def _check(self, topic: str) -> None:
        failure = self.refuse.get(topic)
        if failure is not None:
            if self.refuse_once:
                del self.refuse[topic]
            raise failure

    async def send_and_wait(self, topic: str, value: bytes, key: bytes | None = None,
                            headers: list[tuple[str, bytes]] | None = None) -> None:
        self._check(topic)
        self.sent.append((topic, value, list(headers or [])))

    async def send(self, topic: str, value: bytes, key: bytes | None = None,
                   headers: list[tuple[str, bytes]] | None = None) -> asyncio.Future[None]:
        await self.send_and_wait(topic, value, key, headers)
        ack: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ack.set_result(None)
        return ack

    def to(self, topic: str) -> list[dict[str, Any]]:
        """The messages sent to `topic`, decoded."""
        return [json.loads(value) for t, value, _ in self.sent if t == topic]


def routed_record(request: InferenceRequest, *, origin: str = "", headers: list[tuple[str, bytes]] | None = None,
                  offset: int = 1, value: bytes | None = None) -> ConsumerRecord:
    """A routed message on worker w1's topic, as a dispatcher publishes it."""
    if value is None:
        value = RoutedRequest(request=request, decision=RoutingDecision(worker_id="w1", policy="least_request"),
                              origin=origin).to_bytes()
    rid = request.request_id
    return ConsumerRecord(topic=TOPIC, partition=0, offset=offset, timestamp=0, timestamp_type=0, key=rid.encode(),
                          value=value, checksum=None, serialized_key_size=len(rid), serialized_value_size=len(value),
                          headers=headers or [])
