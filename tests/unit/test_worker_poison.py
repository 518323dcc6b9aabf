"""The worker's per-record failure path on fakes (no broker, no Redis): whatever fails is answered or
dead-lettered with a reason and the record completes; nothing is retried for ever; request-id reuse,
expired deadlines, results too large for the broker and a Redis out of memory each have a clear outcome."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, TopicAuthorizationFailedError
from worker_fakes import FakeLedger, FakeProducer, by_prompt, engine, routed_record

from lodestar.schemas import InferenceRequest, SamplingParams, now_ms
from lodestar.settings import Settings
from workers.dedupe import CompletedRequest, request_digest
from workers.service import WorkerService

RESULTS, TELEMETRY, DLQ = "lodestar.results", "lodestar.telemetry", "lodestar.dlq"


@pytest.fixture
def calls() -> list[dict[str, Any]]:
    return []


@pytest.fixture
def service(calls: list[dict[str, Any]]) -> WorkerService:
    settings = Settings(worker={"worker_id": "w1", "sglang_url": "http://engine", "retry_backoff_s": 0.001},
                        limits={"max_message_bytes": 262_144})
    worker = WorkerService(settings, engine=engine(by_prompt, calls))
    worker.ledger = FakeLedger()  # type: ignore[assignment]
    worker._producer = FakeProducer()  # type: ignore[assignment]
    return worker


def producer(service: WorkerService) -> FakeProducer:
    return service._producer  # type: ignore[return-value]


def ledger(service: WorkerService) -> FakeLedger:
    return service.ledger  # type: ignore[return-value]


def counter(service: WorkerService, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, {"worker": "w1", **labels}) or 0.0


async def handle(service: WorkerService, request: InferenceRequest, **kw: Any) -> None:
    await asyncio.wait_for(service._run_record(routed_record(request, **kw)), 10)  # never retried for ever


def ask(prompt: str = "hello", **kw: Any) -> InferenceRequest:
    return InferenceRequest(request_id=kw.pop("request_id", "r1"), prompt=prompt,
                            sampling=SamplingParams(max_new_tokens=3), **kw)


async def test_an_expired_request_is_answered_without_calling_the_engine(service: WorkerService,
                                                                           calls: list[dict[str, Any]]) -> None:
    await handle(service, ask(deadline_ms=now_ms() - 5_000))
    assert calls == []
    (result,) = producer(service).to(RESULTS)
    assert result["status"] == "error" and result["error"].startswith("deadline exceeded")
    (event,) = producer(service).to(TELEMETRY)
    assert event["status"] == "error"  # the learner skips it
    assert counter(service, "lodestar_worker_answered_total", reason="deadline_exceeded") == 1
    await handle(service, ask(request_id="r2", deadline_ms=now_ms() + 60_000, priority=7))
    assert len(calls) == 1 and calls[0]["priority"] == 7  # in time: served, its priority passed to SGLang


async def test_a_redis_out_of_memory_skips_storing_and_still_answers(service: WorkerService) -> None:
    ledger(service).oom = True
    await handle(service, ask())
    (result,) = producer(service).to(RESULTS)
    assert result["status"] == "ok" and result["text"] == "Hello!"
    assert counter(service, "lodestar_worker_redis_writes_skipped_total", write="store") == 1
    assert counter(service, "lodestar_worker_redis_writes_skipped_total", write="mark_done") == 1
    assert producer(service).to(DLQ) == []


async def test_a_result_too_large_for_the_broker_becomes_an_error_result_and_a_dead_letter(
        service: WorkerService) -> None:
    await handle(service, ask("long:300000"))
    (result,) = producer(service).to(RESULTS)
    assert result["status"] == "error" and result["text"] == ""
    assert "over limits.max_message_bytes=262144" in result["error"]
    assert len(producer(service).to(TELEMETRY)) == 1
    (letter,) = producer(service).to(DLQ)
    assert letter["stage"] == "publish" and letter["error_type"] == "lodestar.limits.OversizedMessage"
    assert counter(service, "lodestar_worker_dlq_total", stage="publish") == 1


async def test_a_refused_reply_topic_is_dead_lettered_not_retried_for_ever(service: WorkerService) -> None:
    producer(service).refuse[RESULTS] = TopicAuthorizationFailedError(RESULTS)
    await handle(service, ask())
    (letter,) = producer(service).to(DLQ)
    assert letter["stage"] == "publish" and "TopicAuthorizationFailedError" in letter["error_type"]


async def test_a_broker_hiccup_is_retried_and_the_result_published_once(service: WorkerService) -> None:
    producer(service).refuse[RESULTS] = KafkaConnectionError()
    producer(service).refuse_once = True
    await handle(service, ask())
    assert [r["status"] for r in producer(service).to(RESULTS)] == ["ok"]
    assert producer(service).to(DLQ) == []


@pytest.mark.parametrize(("change", "reason"), [
    ({"reply_to": "__consumer_offsets"}, "reply_to '__consumer_offsets' is a Kafka internal topic"),
    ({"reply_to": "lodestar.requests"}, "reply_to 'lodestar.requests' is a Lodestar system topic"),
    ({"reply_to": "lodestar.worker.w2"}, "is a Lodestar system topic"),
    ({"prompt": None, "input_ids": [262_144]}, "beyond limits.max_token_id=262143"),
])
async def test_what_a_dispatcher_should_have_refused_is_refused_again(service: WorkerService,
                                                                     change: dict[str, Any], reason: str) -> None:
    request = ask().model_copy(update=change)  # built past validation, as a hostile producer would
    await handle(service, request)
    (letter,) = producer(service).to(DLQ)
    assert letter["stage"] == "decode" and reason in letter["reason"]
    assert producer(service).to(RESULTS) == []


async def test_an_oversized_or_unreadable_routed_message_is_dead_lettered(service: WorkerService) -> None:
    await handle(service, ask(), value=b"x" * 300_000)
    await handle(service, ask(), value=b'{"request": {"prompt": NaN}}')
    letters = producer(service).to(DLQ)
    assert [x["stage"] for x in letters] == ["decode", "decode"]
    assert "over the 262144-byte limit" in letters[0]["reason"] and letters[0]["payload_truncated"]
    assert "request.prompt: Input should be a valid string; decision: Field required" in letters[1]["reason"]


def done_before(service: WorkerService, request: InferenceRequest, origin: str, *, stored: bool = True) -> None:
    """`request` was answered before, from the record `origin`."""
    digest = request_digest(request)
    ledger(service).done[request.request_id] = (origin, digest)
    if stored:
        result = {"request_id": request.request_id, "worker_id": "w1", "status": "ok", "text": "first answer"}
        ledger(service).stored[request.request_id] = CompletedRequest.model_validate_json(json.dumps(
            {"reply_topic": RESULTS, "result": result, "telemetry": None, "request_digest": digest}))


async def test_a_redelivery_of_an_answered_request_is_skipped(service: WorkerService,
                                                              calls: list[dict[str, Any]]) -> None:
    request = ask()
    done_before(service, request, "3@17")
    await handle(service, request, origin="3@17")
    assert producer(service).sent == [] and calls == []


async def test_a_request_id_used_again_for_the_same_request_gets_its_result_replayed(
        service: WorkerService, calls: list[dict[str, Any]]) -> None:
    done_before(service, ask(), "3@17")
    retry = ask(reply_to="lodestar.reply.fe-2", deadline_ms=now_ms() + 60_000)  # new timing, new reply topic
    await handle(service, retry, origin="5@2")
    assert calls == [] and producer(service).to(TELEMETRY) == []
    (topic, value, _), = producer(service).sent
    replay = json.loads(value)
    assert topic == "lodestar.reply.fe-2" and replay["replayed"] is True and replay["text"] == "first answer"
    assert counter(service, "lodestar_worker_answered_total", reason="replayed") == 1


async def test_a_request_id_used_again_for_another_request_is_refused(service: WorkerService,
                                                                      calls: list[dict[str, Any]]) -> None:
    done_before(service, ask(), "3@17")
    await handle(service, ask("something else"), origin="5@2")
    assert calls == []
    (result,) = producer(service).to(RESULTS)
    assert result["status"] == "error" and "already used by a different request" in result["error"]
    (letter,) = producer(service).to(DLQ)
    assert letter["stage"] == "dedupe" and "already used by a different request" in letter["reason"]


async def test_a_reused_id_whose_result_is_gone_gets_an_error_saying_so(service: WorkerService) -> None:
    done_before(service, ask(), "3@17", stored=False)
    await handle(service, ask(), origin="5@2")
    (result,) = producer(service).to(RESULTS)
    assert result["status"] == "error" and "no longer stored" in result["error"]
    assert producer(service).to(DLQ) == []
