"""Reading a stream back from a reply topic: order, repeats, fragments, and what a second serving does
(lodestar/streams.py, lodestar/client.py Reply)."""

from __future__ import annotations

import asyncio

import pytest

from lodestar.client import LodestarClient, Reply
from lodestar.schemas import InferenceResult, StreamChunk
from lodestar.settings import Settings
from lodestar.streams import ChunkAssembler, StreamInterrupted, decode_reply


def chunk(seq: int, text: str = "", serve: str = "s1", data: str = "", more: bool = False) -> StreamChunk:
    return StreamChunk(request_id="r1", worker_id="w1", serve_id=serve, seq=seq, text=text, data=data, more=more)


def result(status: str = "ok", text: str = "") -> InferenceResult:
    return InferenceResult(request_id="r1", worker_id="w1", status=status, text=text)  # type: ignore[arg-type]


def test_chunks_in_order_repeats_dropped():
    a = ChunkAssembler()
    assert [a.accept(chunk(0, "a")), a.accept(chunk(1, "b")), a.accept(chunk(1, "b")), a.accept(chunk(2, "c"))] == [
        "a", "b", None, "c"]
    assert a.duplicates == 1


def test_a_lost_chunk_interrupts():
    a = ChunkAssembler()
    a.accept(chunk(0, "a"))
    with pytest.raises(StreamInterrupted, match="chunk 1 .* was lost"):
        a.accept(chunk(2, "c"))


def test_fragments_are_joined():
    a = ChunkAssembler()
    assert a.accept(chunk(0, data='{"x":', more=True)) is None
    assert a.accept(chunk(1, data='"yz', more=True)) is None
    assert a.accept(chunk(2, data='"}')) == '{"x":"yz"}'


def test_a_new_serving_replaces_one_nothing_was_delivered_from():
    a = ChunkAssembler()
    a.accept(chunk(0, "old"))
    a.accept(chunk(1, data="{", more=True))
    assert a.accept(chunk(0, "new", serve="s2")) == "new"
    assert a.restarts == 1 and a.serve_id == "s2"


def test_a_new_serving_after_delivered_output_interrupts():
    a = ChunkAssembler()
    a.accept(chunk(0, "old"))
    a.delivered = True
    with pytest.raises(StreamInterrupted, match="served again"):
        a.accept(chunk(0, "new", serve="s2"))


def test_decode_reply_tells_chunks_from_results():
    assert isinstance(decode_reply(chunk(0, "a").to_bytes()), StreamChunk)
    assert isinstance(decode_reply(result(text='"kind"').to_bytes()), InferenceResult)  # the mark inside a text
    assert isinstance(decode_reply(result().to_bytes()), InferenceResult)


async def iterate(reply: Reply) -> list[str]:
    return [piece async for piece in reply]


async def test_reply_streams_pieces_then_ends_with_the_result():
    reply = Reply("r1")
    reading = asyncio.create_task(iterate(reply))
    await asyncio.sleep(0)
    for c in (chunk(0, "a"), chunk(0, "a"), chunk(1, "b")):
        reply._chunk(c)
    reply._result(result(text="ab"))
    assert await reading == ["a", "b"]
    assert reply.result.text == "ab"


async def test_events_sent_together_are_handed_on_one_by_one():
    reply = Reply("r1")
    reading = asyncio.create_task(iterate(reply))
    await asyncio.sleep(0)
    reply._chunk(chunk(0, data='{"e":1}'))
    reply._chunk(chunk(1, data='{"e":2}\n{"e":', more=True))
    reply._chunk(chunk(2, data='3}'))
    reply._chunk(chunk(3, text="plain\ntext"))  # text is never split
    reply._result(result())
    assert await reading == ['{"e":1}', '{"e":2}', '{"e":3}', "plain\ntext"]


async def test_a_streaming_reply_fails_on_a_takeover_after_output():
    reply = Reply("r1")
    reading = asyncio.create_task(iterate(reply))
    await asyncio.sleep(0)
    reply._chunk(chunk(0, "a"))
    await asyncio.sleep(0)
    reply._chunk(chunk(0, "x", serve="s2"))
    with pytest.raises(StreamInterrupted):
        await reading


async def test_collect_keeps_the_last_serving_only():
    reply = Reply("r1")
    reply._chunk(chunk(0, data="old body"))
    reply._chunk(chunk(0, data="new body", serve="s2"))  # the first worker died after sending its body
    reply._result(result())
    pieces, res = await reply.collect()
    assert pieces == ["new body"] and res.status == "ok" and reply.restarts == 1


async def test_a_reply_longer_than_its_bound_fails():
    reply = Reply("r1", max_chars=5)
    reply._chunk(chunk(0, "abcd"))
    reply._chunk(chunk(1, "efgh"))
    with pytest.raises(StreamInterrupted, match="longer than 5"):
        await reply.collect()


async def test_client_routes_chunks_and_counts_strangers():
    client = LodestarClient(Settings())
    reply = client._replies["r1"] = Reply("r1")
    client._accept(chunk(0, "a").to_bytes())
    client._accept(chunk(0, "a").to_bytes())
    client._accept(StreamChunk(request_id="gone", worker_id="w", serve_id="s", seq=0, text="z").to_bytes())
    client._accept(result().to_bytes())
    pieces, _ = await reply.collect()
    assert pieces == ["a"] and client.duplicate_chunks == 1 and client.orphan_replies == 1
