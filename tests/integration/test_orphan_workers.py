"""Dead workers found from their topic's consumer lag (dispatcher/orphans.py) on the real broker and Redis: a
worker topic with uncommitted records and no consumer is an orphan even when `workers:seen` (lost with a Redis
restarted empty) does not name it; the takeover then records it as seen, and re-routes it after the timeout."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from worker_harness import cleanup, create_topics, isolated_settings, produce, routed

from dispatcher.orphans import OrphanFinder
from lodestar.kafka_io import make_consumer
from lodestar.names import RedisKeys, Topics
from lodestar.redis_io import make_redis
from lodestar.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def settings(kafka_bootstrap: str, redis_url: str) -> AsyncIterator[Settings]:
    isolated = isolated_settings(kafka_bootstrap, redis_url, worker_id="w9")
    await create_topics(isolated)
    yield isolated
    await cleanup(isolated)


async def test_a_worker_topic_with_a_backlog_and_no_consumer_is_an_orphan(settings: Settings) -> None:
    topics = Topics(settings.kafka.topic_prefix)
    finder = OrphanFinder(settings, client_id="test-orphans")
    assert await finder.find(set()) == []  # an empty topic: nothing waits there
    await produce(settings, topics.worker("w9"), [routed("w9").to_bytes(), routed("w9").to_bytes()])
    assert await finder.find(set()) == ["w9"]
    assert await finder.find({"w9"}) == []  # already known (live, or in workers:seen)

    # a live consumer in the group: not an orphan, whatever its lag
    consumer = make_consumer(settings, topics.worker("w9"), group_id=topics.worker_group("w9"),
                             client_id="test-worker-w9")
    await consumer.start()
    try:
        await consumer.getmany(timeout_ms=3000)
        assert await finder.find(set()) == []
        await consumer.commit()  # and once everything is committed there is no backlog either
    finally:
        await consumer.stop()
    assert await finder.find(set()) == []


async def test_the_takeover_records_an_orphan_as_seen(settings: Settings) -> None:
    from dispatcher.redispatch import DeadWorkerTakeover
    from dispatcher.worker_view import WorkerView
    from lodestar.worker_registry import WorkerRegistry

    topics = Topics(settings.kafka.topic_prefix)
    await produce(settings, topics.worker("w9"), [routed("w9").to_bytes()])
    client = make_redis(settings)
    keys = RedisKeys(settings.redis.key_prefix)
    try:
        view = WorkerView(WorkerRegistry(client, keys, settings.worker.state_ttl_s), staleness_s=0.0)
        takeover = DeadWorkerTakeover(settings, client, view, reroute=None, remove_prefixes=None,  # type: ignore[arg-type]
                                      dead_letter=None, dispatcher_id="t",  # type: ignore[arg-type]
                                      find_orphans=OrphanFinder(settings, client_id="test-orphans").find)
        assert await takeover.check_once() == {}  # just recorded: taken over only after the timeout
        assert await client.zscore(keys.workers_seen, "w9") is not None
    finally:
        await client.aclose()
