"""Poison on the real broker and Redis: each of issue 13's poison messages ends answered or dead-lettered with
a reason, in the same batch as good requests that are routed, while the dispatcher keeps running and its
partitions keep committing; an unexpected failure of a whole batch isolates the record that causes it; a
transient failure holds the batch and retries it; a request id used again through the whole pipeline is
replayed, refused, or skipped as a redelivery; an expired request is never generated."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest
from dispatcher_harness import (
    FakeWorkers,
    committed_total,
    dispatch_settings,
    produce_requests,
    running_dispatcher,
    shared_prefix_requests,
    wait_until,
)
from fuzz_messages import poison
from redis.exceptions import ConnectionError as RedisConnectionError
from worker_harness import (
    TopicReader,
    cleanup,
    create_topics,
    engine_requests_total,
    isolated_settings,
    produce,
    registry,
    require_services,
    routed,
    running_worker,
    wait_committed,
)

from lodestar.client import LodestarClient
from lodestar.hashing import token_block_hashes
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.limits import Limits
from lodestar.names import Topics
from lodestar.schemas import InferenceRequest, RoutedRequest, SamplingParams, now_ms
from lodestar.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
def settings() -> Settings:
    s = dispatch_settings()
    require_services(s)
    return s


def routed_ids(reader: TopicReader, topic: str) -> list[str]:
    return [m["request"]["request_id"] for m in reader.messages[topic]]


async def test_each_poison_message_is_answered_or_dead_lettered_and_the_partition_moves_on(
        settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    cases = poison(topics)
    good = shared_prefix_requests(6)
    largest = Limits(settings).max_request_bytes
    big = InferenceRequest(request_id="largest-admitted", prompt="b" * (largest - 400))
    assert largest - 200 < len(big.to_bytes()) <= largest
    values = [cases.pop("expired deadline"), *[g.to_bytes() for g in good[:3]], *cases.values(),
              big.to_bytes(), *[g.to_bytes() for g in good[3:]], None]
    worker = topics.worker("wa")
    async with FakeWorkers(settings) as workers, running_dispatcher(settings) as service, \
            TopicReader(settings, topics.dlq, topics.results, worker) as reader:
        await workers.add("wa")
        await produce(settings, topics.requests, values, key=b"one-partition")  # all in one batch, in order
        await reader.wait_for(lambda m: len(m[topics.dlq]) >= len(cases) + 1 and m[topics.results]
                              and len(m[worker]) >= len(good) + 1, timeout=30)
        await wait_until(lambda: service.stats.batches >= 1, 10, "the batch")
        first = len(values)
        assert await committed_total(settings, settings.dispatcher.consumer_group, topics.requests) == first
        # still running, still committing
        await produce_requests(settings, [InferenceRequest(request_id="after-the-poison", prompt="still there?")])
        await reader.wait_for(lambda m: "after-the-poison" in routed_ids(reader, worker), timeout=30)
        await wait_until(lambda: service.stats.routed == len(good) + 2, 10, "routing after the poison")
        assert await committed_total(settings, settings.dispatcher.consumer_group, topics.requests) == first + 1
    assert sorted(routed_ids(reader, worker)) == sorted([g.request_id for g in good] + [big.request_id,
                                                                                        "after-the-poison"])
    letters = reader.messages[topics.dlq]
    assert len(letters) == len(cases) + 1 and all(m["stage"] == "validate" for m in letters)

    def letter(value: bytes | None) -> dict[str, object]:
        (found,) = [m for m in letters if m["payload_bytes"] == len(value or b"")
                    and m["payload"][:30] == (value or b"")[:30].decode("utf-8", "replace")]
        return found

    expected = {
        "uint32 overflow": "input_ids.0: Input should be less than or equal to 2147483647",
        "beyond the vocabulary": "token id 262144, beyond limits.max_token_id=262143",
        "near 1 MB": f"over the {largest}-byte limit",
        "NaN": "sampling.temperature: Input should be a finite number",
        "Infinity deadline": "deadline_ms: Input should be a finite number",
        "reply to __consumer_offsets": "reply_to '__consumer_offsets' is a Kafka internal topic",
        "reply to the requests topic": f"reply_to '{topics.requests}' is a Lodestar system topic",
        "reply to a worker topic": "is a Lodestar system topic",
        "lone surrogate": "Invalid JSON",
        "not JSON": "Invalid JSON",
    }
    assert set(expected) == set(cases)
    for name, fragment in expected.items():
        assert fragment in str(letter(cases[name])["reason"]), name
    assert "empty message" in str(letter(None)["reason"])
    near_1mb = letter(cases["near 1 MB"])
    assert near_1mb["payload"].encode() == cases["near 1 MB"] and not near_1mb["payload_truncated"]  # it fits
    assert all(m["error_type"] == "lodestar.schemas.InvalidMessage" for m in reader.messages[topics.dlq])
    (expired,) = reader.messages[topics.results]
    assert expired["request_id"] == "p9" and expired["status"] == "error"
    assert expired["error"].startswith("deadline exceeded")
    assert service.metrics.registry.get_sample_value("lodestar_dispatcher_answered_total",
                                                     {"reason": "deadline_exceeded"}) == 1


async def test_a_record_that_fails_its_whole_batch_is_isolated_and_dead_lettered(settings: Settings) -> None:
    """A failure outside the per-record checks (here: the prefix-index lookup breaks on one request's blocks,
    as a bug would) fails the batch; its records are retried one by one and only the culprit is dead-lettered."""
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    culprit = InferenceRequest(request_id="culprit", input_ids=[7] * 32)
    poisoned = set(token_block_hashes(culprit.input_ids or [], settings.prefix.tokens_per_block))
    good = shared_prefix_requests(5)
    async with FakeWorkers(settings) as workers, running_dispatcher(settings) as service, \
            TopicReader(settings, topics.dlq, topics.worker("wa")) as reader:
        await workers.add("wa")
        lookup = service.prefix_index.match_many

        async def breaks_on_the_culprit(chains: Sequence[Sequence[int]], worker_ids: Sequence[str]) -> np.ndarray:
            if any(poisoned & set(chain) for chain in chains):
                raise ValueError("the prefix index cannot take these blocks")
            return await lookup(chains, worker_ids)

        service.prefix_index.match_many = breaks_on_the_culprit  # type: ignore[method-assign]
        await produce(settings, topics.requests, [g.to_bytes() for g in good[:2]] + [culprit.to_bytes()]
                      + [g.to_bytes() for g in good[2:]], key=b"one-partition")
        await reader.wait_for(lambda m: m[topics.dlq] and len(m[topics.worker("wa")]) >= len(good), timeout=30)
        await wait_until(lambda: service.stats.routed == len(good), 10, "routing")
        assert await committed_total(settings, settings.dispatcher.consumer_group, topics.requests) == len(good) + 1
    (letter,) = reader.messages[topics.dlq]
    assert letter["stage"] == "dispatch" and letter["error_type"] == "ValueError"
    assert letter["reason"] == "the prefix index cannot take these blocks"
    assert json.loads(letter["payload"])["request_id"] == "culprit"
    assert sorted(routed_ids(reader, topics.worker("wa"))) == sorted(g.request_id for g in good)


async def test_a_transient_failure_holds_the_batch_and_retries_it(settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    await ensure_topics(settings, fixed_topic_partitions(settings))
    requests = shared_prefix_requests(4)
    async with FakeWorkers(settings) as workers, running_dispatcher(settings) as service, \
            TopicReader(settings, topics.dlq, topics.worker("wa")) as reader:
        await workers.add("wa")
        lookup = service.prefix_index.match_many
        outage = {"left": 3}

        async def redis_down(chains: Sequence[Sequence[int]], worker_ids: Sequence[str]) -> np.ndarray:
            if outage["left"]:
                outage["left"] -= 1
                raise RedisConnectionError("Error 111 connecting to 127.0.0.1:16379. Connection refused.")
            return await lookup(chains, worker_ids)

        service.prefix_index.match_many = redis_down  # type: ignore[method-assign]
        await produce_requests(settings, requests)
        await reader.wait_for(lambda m: len(m[topics.worker("wa")]) >= len(requests), timeout=30)
        await wait_until(lambda: service.stats.routed == len(requests), 10, "routing")
        assert await committed_total(settings, settings.dispatcher.consumer_group, topics.requests) == len(requests)
        await reader.poll(0.5)
    assert reader.messages[topics.dlq] == []  # the environment failed, not the records
    assert sorted(routed_ids(reader, topics.worker("wa"))) == sorted(r.request_id for r in requests)
    assert service.metrics.registry.get_sample_value("lodestar_dispatcher_batch_retries_total") == 3


@pytest.fixture
async def pipeline(engine_url: str) -> AsyncIterator[Settings]:
    """A dispatcher and worker w1 in front of the emulator, in this process, on a namespace of their own."""
    s = isolated_settings(sglang_url=engine_url)
    s.dispatcher = s.dispatcher.model_copy(update={"consumer_group": f"{s.kafka.topic_prefix}dispatchers",
                                                   "policy": "least_request"})
    await create_topics(s)
    async with running_worker(s), running_dispatcher(s):
        yield s
    await cleanup(s)


async def test_a_request_id_used_again_is_replayed_refused_or_skipped(pipeline: Settings, engine_url: str) -> None:
    settings = pipeline
    topics = Topics(settings.kafka.topic_prefix)
    before = engine_requests_total(engine_url)
    first = InferenceRequest(request_id="idem-1", prompt="tell me about the stars",
                             sampling=SamplingParams(max_new_tokens=6))
    async with LodestarClient(settings) as client, TopicReader(settings, topics.results, topics.dlq) as reader:
        answer = await client.request(first, timeout_s=60)
        retry = await client.request(first, timeout_s=60)  # the same request, sent again with its id
        other = await client.request(InferenceRequest(request_id="idem-1", prompt="something else"), timeout_s=60)
        await reader.wait_for(lambda m: m[topics.dlq], timeout=20)
    assert answer.status == "ok" and not answer.replayed and answer.text
    assert retry.replayed and retry.text == answer.text and retry.completion_tokens == answer.completion_tokens
    assert other.status == "error" and "already used by a different request" in (other.error or "")
    (letter,) = reader.messages[topics.dlq]
    assert letter["stage"] == "dedupe" and letter["service"] == "worker"
    assert engine_requests_total(engine_url) - before == 1  # generated once

    # one more delivery of the record that was answered (a dispatcher that died before committing): skipped
    client_redis, keys, _ = registry(settings)
    done = await client_redis.get(keys.dedupe("idem-1"))
    await client_redis.aclose()
    origin = done.split(" ")[1]
    again = RoutedRequest(request=first, decision=routed().decision, origin=origin)
    async with TopicReader(settings, topics.results) as reader:
        await produce(settings, topics.worker("w1"), [again.to_bytes()])
        await wait_committed(settings, topics.worker_group("w1"), topics.worker("w1"), 4)
        await reader.poll(1.0)
    assert len(reader.messages[topics.results]) == 3  # the three answers above, nothing more


async def test_an_expired_request_is_answered_with_an_error_and_never_generated(pipeline: Settings,
                                                                                engine_url: str) -> None:
    settings = pipeline
    topics = Topics(settings.kafka.topic_prefix)
    before = engine_requests_total(engine_url)
    late = routed(request_id="late-1", deadline_ms=now_ms() - 1.0)  # expired on its way to the worker
    async with LodestarClient(settings) as client, TopicReader(settings, topics.results, topics.telemetry) as reader:
        result = await client.request(InferenceRequest(request_id="too-late", prompt="x", deadline_ms=now_ms() - 1),
                                      timeout_s=30)
        await produce(settings, topics.worker("w1"), [late.to_bytes()])
        await reader.wait_for(lambda m: len(m[topics.results]) >= 2, timeout=30)
    assert result.status == "error" and result.worker_id == "" and result.error.startswith("deadline exceeded")
    by_worker = [r for r in reader.messages[topics.results] if r["request_id"] == "late-1"]
    assert by_worker[0]["status"] == "error" and by_worker[0]["error"].startswith("deadline exceeded")
    assert engine_requests_total(engine_url) == before

