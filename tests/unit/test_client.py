"""The client's result handling: one result per request id, duplicates counted and never returned."""

from __future__ import annotations

import asyncio

from lodestar.client import LodestarClient, reply_topic_for
from lodestar.names import Topics
from lodestar.schemas import InferenceResult
from lodestar.settings import Settings


def result(rid: str, text: str) -> bytes:
    return InferenceResult(request_id=rid, worker_id="w", status="ok", text=text).to_bytes()


async def test_first_result_wins_and_duplicates_are_counted():
    client = LodestarClient(Settings())
    fut: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
    client._pending["r1"] = fut
    client._accept(result("r1", "first"))
    client._accept(result("r1", "second"))
    assert fut.result().text == "first"
    assert client.duplicate_results == 1


async def test_foreign_and_unreadable_results_are_ignored():
    client = LodestarClient(Settings())
    fut: asyncio.Future[InferenceResult] = asyncio.get_running_loop().create_future()
    client._pending["mine"] = fut
    client._accept(result("someone-else", "x"))
    client._accept(b"{not json")
    client._accept(None)
    assert not fut.done() and client.duplicate_results == 0


def test_reply_topics():
    assert LodestarClient(Settings()).reply_topic == "lodestar.results"
    assert reply_topic_for("fe1", Topics("t1.")) == "t1.reply.fe1"
    assert LodestarClient(Settings(), reply_topic="t1.reply.fe1").reply_topic == "t1.reply.fe1"


async def test_a_request_sent_again_with_its_id_takes_the_next_answer():
    client = LodestarClient(Settings())
    loop = asyncio.get_running_loop()
    first: asyncio.Future[InferenceResult] = loop.create_future()
    client._pending["r1"] = first
    client._accept(result("r1", "first"))
    del client._pending["r1"]
    again: asyncio.Future[InferenceResult] = loop.create_future()  # the caller retries with the same id
    client._pending["r1"] = again
    client._accept(InferenceResult(request_id="r1", worker_id="w", status="ok", text="first", replayed=True).to_bytes())
    assert again.result().replayed and again.result().text == "first"
    client._accept(result("r1", "late copy"))
    assert client.duplicate_results == 1
