"""The worker's engine client on its default transport (lodestar/http_transport.py: httpx on aiohttp) against a
real HTTP server on loopback: streams arrive whole and in order, connections are reused, and the failures keep
the classes the worker's retry and error statuses depend on (workers/sglang_client.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from workers.sglang_client import EngineError, EngineUnavailable, RetryPolicy, SGLangClient, StreamMeter

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def event(i: int) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": f" tok{i}"}}]}).encode() + b"\n\n"


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = lengths[0] if lengths else 0
    return await reader.readexactly(length)


class Server:
    """A loopback HTTP/1.1 server answering each request with `handler`; counts connections and closed ones."""

    def __init__(self, handler: Handler):
        self.handler = handler
        self.connections = 0
        self.closed_by_client = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while not reader.at_eof():
                try:
                    await read_request(reader)
                except asyncio.IncompleteReadError:
                    break
                await self.handler(reader, writer)
            self.closed_by_client.set()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed_by_client.set()
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: Any) -> None:
        assert self._server is not None
        self._server.close()


def engine(url: str, attempts: int = 1, timeout_s: float = 5.0) -> SGLangClient:
    async def no_sleep(_: float) -> None:
        return None
    return SGLangClient(url, request_timeout_s=timeout_s, retry=RetryPolicy(attempts, 0.01), sleep=no_sleep)


async def collect(client: SGLangClient) -> list[dict[str, Any]]:
    return [e async for _, e in client.stream_events("/v1/chat/completions", {"stream": True}, StreamMeter())]


async def test_streams_arrive_whole_in_order_and_reuse_the_connection():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for i in range(40):  # one write per event, as an engine streams them
            writer.write(chunk(event(i)))
            await writer.drain()
        writer.write(chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async with Server(answer) as url:
        client = engine(url)
        for _ in range(3):
            events = await collect(client)
            assert [e["choices"][0]["delta"]["content"] for e in events] == [f" tok{i}" for i in range(40)]
        await client.aclose()


async def test_a_read_body_returns_its_connection_to_the_pool():
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunk(event(0)) + chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    server = Server(answer)
    async with server as url:
        client = engine(url)
        for _ in range(5):
            assert len(await collect(client)) == 1
        await client.aclose()
    assert server.connections == 1


async def test_a_refused_connection_is_unavailable_and_retried():
    async with Server(lambda r, w: asyncio.sleep(0)) as url:
        pass  # closed: nothing listens on its port any more
    client = engine(url, attempts=3)
    meter = StreamMeter()
    with pytest.raises(EngineUnavailable, match=r"unreachable.*gave up after 4 attempts"):  # 3 retries
        async for _ in client.stream_events("/v1/chat/completions", {}, meter):
            pass
    await client.aclose()


async def test_a_stalled_stream_times_out_and_a_cut_one_is_unavailable():
    async def stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunk(event(0)))
        await writer.drain()
        await asyncio.sleep(5)

    async with Server(stall) as url:
        client = engine(url, timeout_s=0.3)
        got = []
        with pytest.raises(EngineError, match="timed out") as err:
            async for _, e in client.stream_events("/v1/chat/completions", {}, StreamMeter()):
                got.append(e)
        assert not isinstance(err.value, EngineUnavailable) and len(got) == 1  # not retried: output was out
        await client.aclose()

    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + chunk(event(0)))
        await writer.drain()
        writer.transport.abort()

    async with Server(cut) as url:
        client = engine(url, attempts=3)
        with pytest.raises(EngineUnavailable):
            await collect(client)
        await client.aclose()


async def test_a_stream_left_half_read_closes_its_connection():
    """A cancelled generation (an abort) must close the engine's connection: SGLang aborts a request whose client
    went away, and a half-read connection must not go back to the pool."""
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for i in range(1000):
            writer.write(chunk(event(i)))
            await writer.drain()
            await asyncio.sleep(0.01)

    server = Server(endless)
    async with server as url:
        client = engine(url)

        async def read_some() -> None:
            async for _ in client.stream_events("/v1/chat/completions", {}, StreamMeter()):
                pass

        task = asyncio.create_task(read_some())
        await asyncio.sleep(0.1)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.wait_for(server.closed_by_client.wait(), 2.0)
        await client.aclose()
