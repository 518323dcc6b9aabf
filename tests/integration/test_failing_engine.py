"""A failing engine on the real broker and Redis: an emulator made to answer 500s, or to hang, in front of a real
worker. The worker answers every request once (an error while the engine fails), its circuit breaker opens and it
leaves the registry and its group, the requests routed to it meanwhile wait uncommitted, and once the engine
answers again the half-open probe brings the worker back and they are served. A hung engine is cut by the
generation's total deadline, and an engine that stops answering load polls is declared dead with its request
leases released."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from emulator_process import emulator
from worker_harness import (
    TopicReader,
    cleanup,
    create_topics,
    isolated_settings,
    produce,
    registry,
    routed,
    running_worker,
    wait_registered,
)

from lodestar.names import RedisKeys, Topics
from lodestar.redis_io import make_redis
from lodestar.settings import Settings
from workers.breaker import BreakerState
from workers.dedupe import RequestLedger

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def faulty_engine(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with emulator("H100", tmp_path_factory.mktemp("emulator") / "emulator.log", "--fault-injection",
                  "--time-scale", "0.2") as url:
        yield url


def set_fault(url: str, mode: str, **fields: object) -> None:
    response = httpx.post(f"{url}/fault_injection", json={"mode": mode, **fields}, timeout=5)
    assert response.status_code == 200 and response.json()["mode"] == mode


@pytest.fixture
async def settings(kafka_bootstrap: str, redis_url: str, faulty_engine: str) -> AsyncIterator[Settings]:
    set_fault(faulty_engine, "none")
    isolated = isolated_settings(kafka_bootstrap, redis_url, sglang_url=faulty_engine, retry_attempts=1,
                                 breaker_failures=3, breaker_cooldown_s=0.5, generation_timeout_s=3.0,
                                 state_ttl_s=2.0, request_timeout_s=30.0, breaker_probe_timeout_s=3.0)
    await create_topics(isolated)
    yield isolated
    set_fault(faulty_engine, "none")
    await cleanup(isolated)


async def live_ids(settings: Settings) -> set[str]:
    client, _, reg = registry(settings)
    try:
        return {w.worker_id for w in await reg.live_workers()}
    finally:
        await client.aclose()


async def wait_until(predicate, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


async def test_an_engine_answering_500s_opens_the_breaker_and_the_backlog_waits_for_its_return(
        settings: Settings, faulty_engine: str) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    topic = topics.worker("w1")
    async with running_worker(settings) as service, TopicReader(settings, topics.results) as reader:
        set_fault(faulty_engine, "error", status=500)
        failing = [routed(request_id=f"f{n}") for n in range(3)]
        await produce(settings, topic, [m.to_bytes() for m in failing])
        await reader.wait_for(lambda m: len(m[topics.results]) >= 3, timeout=30)
        assert all(r["status"] == "error" and "HTTP 500" in r["error"] for r in reader.messages[topics.results])

        # three failures in a row: declared dead, out of the registry (dispatchers stop routing to it)
        async def gone() -> bool:
            return service.breaker.state is not BreakerState.CLOSED and "w1" not in await live_ids(settings)
        await wait_until(gone, 10, "the worker to leave the registry")
        assert not service.health.ready

        # requests routed to it meanwhile are not taken (it left its group): no result, no error
        waiting = [routed(request_id=f"w{n}") for n in range(2)]
        await produce(settings, topic, [m.to_bytes() for m in waiting])
        await reader.poll(2.0)
        assert len(reader.messages[topics.results]) == 3

        # the engine is back: the half-open probe succeeds, the worker rejoins and serves its backlog once
        set_fault(faulty_engine, "none")
        await wait_registered(settings, timeout=20)
        await reader.wait_for(lambda m: len(m[topics.results]) >= 5, timeout=30)
        await reader.poll(1.0)
    late = [r for r in reader.messages[topics.results] if r["request_id"].startswith("w")]
    assert sorted(r["request_id"] for r in late) == ["w0", "w1"]
    assert all(r["status"] == "ok" for r in late)
    assert service.breaker.times_opened >= 1


async def test_a_hung_generation_is_cut_by_its_total_deadline(settings: Settings, faulty_engine: str) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    async with running_worker(settings) as service, TopicReader(settings, topics.results) as reader:
        set_fault(faulty_engine, "hang")  # generations hang; load polls still answer
        msg = routed(request_id="hung-1")
        started = time.monotonic()
        await produce(settings, topics.worker("w1"), [msg.to_bytes()])
        await reader.wait_for(lambda m: m[topics.results], timeout=20)
        took = time.monotonic() - started
        (result,) = reader.messages[topics.results]
        assert result["status"] == "error" and "generation_timeout_s" in result["error"]
        assert 2.5 < took < 15  # cut at 3 s, not after the 30 s read timeout
        assert service.breaker.failures == 1 and service.breaker.routable


async def test_an_engine_silent_on_load_polls_is_declared_dead_and_its_leases_released(
        settings: Settings, faulty_engine: str) -> None:
    # a long total deadline: the engine is declared dead (load polls silent for 2 s) while the generation hangs
    settings = settings.model_copy(update={"worker": settings.worker.model_copy(update={"generation_timeout_s": 60.0})})
    topics = Topics(settings.kafka.topic_prefix)
    client = make_redis(settings, decode_responses=True)
    other = RequestLedger(client, RedisKeys(settings.redis.key_prefix), owner="other/1", lease_s=5.0,
                          done_ttl_s=60, max_stored_text_bytes=1000)
    try:
        async with running_worker(settings) as service, TopicReader(settings, topics.results) as reader:
            set_fault(faulty_engine, "hang", loads=True)
            msg = routed(request_id="stuck-1")
            await produce(settings, topics.worker("w1"), [msg.to_bytes()])

            async def dead() -> bool:
                return service.breaker.state is not BreakerState.CLOSED and not service._claimed
            await wait_until(dead, 15, "the engine to be declared dead")
            assert "load poll" in service.breaker.reason
            claim = await other.claim("stuck-1")  # the lease was released: a re-routed copy can be served now
            assert claim.state == "claimed"
            await other.release("stuck-1")
            assert reader.messages[topics.results] == []

            set_fault(faulty_engine, "none")
            await wait_registered(settings, timeout=20)
            await reader.wait_for(lambda m: m[topics.results], timeout=30)
            await reader.poll(1.0)
        (result,) = reader.messages[topics.results]
        assert result["request_id"] == "stuck-1" and result["status"] == "ok"
    finally:
        await client.aclose()
