"""The worker registry on the real Redis: what `live_workers` lists, and what it prunes."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from pydantic import SecretStr
from redis.exceptions import NoPermissionError

from lodestar import worker_registry
from lodestar.names import RedisKeys
from lodestar.redis_io import make_redis
from lodestar.schemas import WorkerState
from lodestar.settings import Settings
from lodestar.worker_registry import WorkerRegistry

pytestmark = pytest.mark.integration


@pytest.fixture
async def client(isolated_service_settings: Settings) -> AsyncIterator[tuple[aioredis.Redis, RedisKeys]]:
    keys = RedisKeys(isolated_service_settings.redis.key_prefix)
    redis = make_redis(isolated_service_settings)
    try:
        yield redis, keys
    finally:
        await redis.delete(keys.workers, *(keys.worker_state(w) for w in ("a", "b", "c", "d")))
        await redis.aclose()


def _state(wid: str, **kw: object) -> WorkerState:
    return WorkerState(worker_id=wid, gpu_type="H100", topic=f"t.worker.{wid}", **kw)


async def test_lists_live_workers_sorted_and_prunes_expired_and_unreadable(
        client: tuple[aioredis.Redis, RedisKeys]) -> None:
    redis, keys = client
    registry = WorkerRegistry(redis, keys, state_ttl_s=30)
    written = [_state("c", running=3, kv_usage=0.25, max_kv_tokens=400_000, recent_ttft_ms=12.5),
               _state("a", draining=True, inflight=2), _state("b"), _state("d")]
    for state in written:
        await registry.publish(state)
    await redis.delete(keys.worker_state("b"))  # its heartbeat expired: the id stays in the set
    await redis.hset(keys.worker_state("d"), "running", "-4")  # unreadable: not a routable worker

    live = await registry.live_workers()

    assert [w.worker_id for w in live] == ["a", "c"]
    assert live == [written[1], written[0]]  # every field read back as written
    assert {m.decode() for m in await redis.smembers(keys.workers)} == {"a", "c"}
    again = await registry.live_workers()
    assert again == live and again[1] is live[1]  # an unchanged hash is not parsed again
    await registry.publish(_state("c", running=7))  # a heartbeat with news
    await redis.hset(keys.worker_state("a"), "running", "-1")  # and an entry gone bad since the last listing
    assert [(w.worker_id, w.running) for w in await registry.live_workers()] == [("c", 7)]


async def test_no_worker_is_an_empty_list(client: tuple[aioredis.Redis, RedisKeys]) -> None:
    redis, keys = client
    assert await WorkerRegistry(redis, keys, state_ttl_s=30).live_workers() == []


async def test_a_user_that_may_only_read_the_registry_lists_it(
        isolated_service_settings: Settings, client: tuple[aioredis.Redis, RedisKeys],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The gateway's ACL (docs/security.md) reads the registry read-only: the listing script runs as EVALSHA_RO
    (a plain EVALSHA is refused such a user), and is loaded by EVAL_RO when the server does not know it."""
    redis, keys = client
    sha = worker_registry._READ_ALL_SHA  # noqa: SLF001 - the script as the registry runs it
    await WorkerRegistry(redis, keys, state_ttl_s=30).publish(_state("a", running=2))
    user, password = f"lodestar-test-ro-{secrets.token_hex(4)}", secrets.token_hex(16)
    await redis.execute_command("ACL", "SETUSER", user, "on", f">{password}", "resetkeys",
                                f"%R~{keys.prefix}worker:*", f"%R~{keys.prefix}workers", "+@all", "-@dangerous")
    login = {"username": user, "password": SecretStr(password)}
    reader = make_redis(isolated_service_settings.redis.model_copy(update=login))
    try:
        registry = WorkerRegistry(reader, keys, state_ttl_s=30)
        assert [(w.worker_id, w.running) for w in await registry.live_workers()] == [("a", 2)]
        monkeypatch.setattr(worker_registry, "_READ_ALL_SHA", "0" * 40)  # a script the server does not know
        assert [w.worker_id for w in await registry.live_workers()] == ["a"]
        with pytest.raises(NoPermissionError):
            await reader.evalsha(sha, 1, keys.worker_state("a"))
    finally:
        await reader.aclose()
        await redis.execute_command("ACL", "DELUSER", user)
