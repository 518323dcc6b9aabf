"""The client's result handling: one result per request id, duplicates counted and never returned."""

from __future__ import annotations

from lodestar.client import LodestarClient, Reply, reply_topic_for
from lodestar.names import Topics
from lodestar.schemas import InferenceResult
from lodestar.settings import Settings


def result(rid: str, text: str) -> bytes:
    return InferenceResult(request_id=rid, worker_id="w", status="ok", text=text).to_bytes()


async def test_first_result_wins_and_duplicates_are_counted():
    client = LodestarClient(Settings())
    reply = client._replies["r1"] = Reply("r1")
    client._accept(result("r1", "first"))
    client._accept(result("r1", "second"))
    assert (await reply.result_only()).text == "first"
    assert client.duplicate_results == 1


async def test_foreign_and_unreadable_results_are_ignored():
    client = LodestarClient(Settings())
    reply = client._replies["mine"] = Reply("mine")
    client._accept(result("someone-else", "x"))
    client._accept(b"{not json")
    client._accept(None)
    assert not reply.done and client.duplicate_results == 0 and client.orphan_replies == 1


def test_reply_topics():
    assert LodestarClient(Settings()).reply_topic == "lodestar.results"
    assert reply_topic_for("fe1", Topics("t1.")) == "t1.reply.fe1"
    assert LodestarClient(Settings(), reply_topic="t1.reply.fe1").reply_topic == "t1.reply.fe1"


async def test_a_request_sent_again_with_its_id_takes_the_next_answer():
    client = LodestarClient(Settings())
    first = client._replies["r1"] = Reply("r1")
    client._accept(result("r1", "first"))
    assert (await first.result_only()).text == "first"
    client.forget("r1")
    again = client._replies["r1"] = Reply("r1")  # the caller retries with the same id
    client._accept(InferenceResult(request_id="r1", worker_id="w", status="ok", text="first", replayed=True).to_bytes())
    replayed = await again.result_only()
    assert replayed.replayed and replayed.text == "first" and client.duplicate_results == 0
    client._accept(result("r1", "late copy"))
    assert client.duplicate_results == 1
