"""Fixtures for tests that need the real Kafka broker and Redis server.

Start them with `scripts/services start` (`make test` does it for you). The addresses, and how to log
in, come from the same settings the application reads (environment, then the YAML file):

    LODESTAR_KAFKA__BOOTSTRAP_SERVERS   default 127.0.0.1:19092 (and LODESTAR_KAFKA__SECURITY_PROTOCOL, ...)
    LODESTAR_REDIS__URL                 default redis://127.0.0.1:16379/0 (and LODESTAR_REDIS__PASSWORD, ...)

A service that does not answer FAILS the tests that need it (pytest.fail, never a skip): a green run
must mean the integration tests really ran.

Fixtures:
    service_settings  (session) the settings those come from (every client is made from them)
    kafka_bootstrap   (session) bootstrap servers of a broker that answers the admin API
    redis_url         (session) URL of a Redis that answers PING
    kafka_topic       a topic name unique to this test (not created; deleted at the end of the session)
    redis_prefix      a key prefix unique to this test, e.g. "test:test-foo-3f2a9c1d:"
    redis_client      redis.asyncio client (decode_responses=True); every key under redis_prefix is
                      deleted after the test
    secure_env        (session) the LODESTAR_KAFKA__*/LODESTAR_REDIS__* settings of the SASL_SSL listener and
                      the TLS + ACL Redis port that `scripts/services start --secure` adds (`make test` and
                      CI do), read from its kafka.env and redis.env in $LODESTAR_SECURE_ENV_DIR, default
                      .run/secure; checked to answer
    engine_url        (module) base URL of an H100 emulator (`lodestar emulator`) shared by a test module
    isolated_service_settings  settings whose topics, Redis keys and signing key no other test shares
                      (worker_harness.isolated_settings), once the broker and Redis answer
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import pytest
import redis.asyncio as aioredis
from emulator_process import emulator
from worker_harness import isolated_settings, require_services

from app.local_services import read_env_file, secure_env_dir, settings_from_env
from lodestar.kafka_io import make_admin
from lodestar.redis_io import make_redis
from lodestar.settings import Settings

SETTINGS = Settings()
KAFKA_BOOTSTRAP = SETTINGS.kafka.bootstrap_servers
REDIS_URL = SETTINGS.redis.url
HOW_TO_START = "start the services with `scripts/services start` (or `make services`; `make test` does it)"
PROBE_TIMEOUT_S = 10.0

T = TypeVar("T")


def run_in_fresh_loop(make_coro: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on its own event loop in a helper thread.

    Session fixtures are sync so they never touch pytest-asyncio's per-test loops."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, make_coro()).result()


def unique_suffix(request: pytest.FixtureRequest, max_len: int = 60) -> str:
    """'<test name>-<8 hex>' using only [a-z0-9-] (safe in topic names and Redis glob patterns)."""
    name = re.sub(r"[^a-zA-Z0-9-]+", "-", request.node.name).strip("-").lower()[:max_len]
    return f"{name}-{uuid.uuid4().hex[:8]}"


def describe(exc: BaseException) -> str:
    text = str(exc) or repr(exc)
    return text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"


async def _describe_kafka(settings: Settings) -> dict[str, Any]:
    admin = make_admin(settings, client_id="test-probe", request_timeout_ms=int(PROBE_TIMEOUT_S * 1000))
    try:
        await asyncio.wait_for(admin.start(), PROBE_TIMEOUT_S)
        info = await asyncio.wait_for(admin.describe_cluster(), PROBE_TIMEOUT_S)
    finally:
        await admin.close()
    if not info.get("brokers"):
        raise RuntimeError("the cluster answers but reports no live broker")
    return info


async def _ping_redis(settings: Settings) -> None:
    client = make_redis(settings, socket_connect_timeout=PROBE_TIMEOUT_S, socket_timeout=PROBE_TIMEOUT_S)
    try:
        if not await client.ping():
            raise RuntimeError("PING did not answer PONG")
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def service_settings() -> Settings:
    return SETTINGS


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    problem = None
    try:
        run_in_fresh_loop(lambda: _describe_kafka(SETTINGS))
    except Exception as exc:
        problem = describe(exc)
    if problem:  # failed outside the except block: no chained traceback around the message
        pytest.fail(f"Kafka does not answer at {KAFKA_BOOTSTRAP} ({problem}); {HOW_TO_START}", pytrace=False)
    return KAFKA_BOOTSTRAP


@pytest.fixture(scope="session")
def redis_url() -> str:
    problem = None
    try:
        run_in_fresh_loop(lambda: _ping_redis(SETTINGS))
    except Exception as exc:
        problem = describe(exc)
    if problem:
        pytest.fail(f"Redis does not answer at {REDIS_URL} ({problem}); {HOW_TO_START}", pytrace=False)
    return REDIS_URL


@pytest.fixture(scope="session")
def secure_env() -> dict[str, str]:
    folder = secure_env_dir()
    files = [folder / "kafka.env", folder / "redis.env"]
    if not all(f.is_file() for f in files):
        pytest.fail(f"no {' or '.join(str(f) for f in files if not f.is_file())}: start the services with "
                    "`scripts/services start --secure` (`make test` and CI do), or point LODESTAR_SECURE_ENV_DIR "
                    "at the .run/secure of the tree that did", pytrace=False)
    env = {k: v for f in files for k, v in read_env_file(f).items()}
    problem = None
    try:
        settings = settings_from_env(env)
        run_in_fresh_loop(lambda: _describe_kafka(settings))
        run_in_fresh_loop(lambda: _ping_redis(settings))
    except Exception as exc:
        problem = describe(exc)
    if problem:
        pytest.fail(f"the secure endpoints of {folder} do not answer ({problem}); {HOW_TO_START} --secure",
                    pytrace=False)
    return env


@pytest.fixture(scope="session")
def _topics_to_delete(kafka_bootstrap: str) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    if not names:
        return

    async def delete() -> None:
        admin = make_admin(SETTINGS, client_id="test-cleanup")
        await admin.start()
        try:
            existing = set(await admin.list_topics())
            doomed = [n for n in names if n in existing]
            if doomed:
                await admin.delete_topics(doomed)
        finally:
            await admin.close()

    try:  # best effort: a leftover topic on a scratch broker harms nothing
        run_in_fresh_loop(delete)
    except Exception as exc:
        print(f"warning: could not delete test topics {names}: {exc}")


@pytest.fixture
def isolated_service_settings() -> Settings:
    settings = isolated_settings()
    require_services(settings)
    return settings


@pytest.fixture(scope="module")
def engine_url(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with emulator("H100", tmp_path_factory.mktemp("emulator") / "emulator.log") as url:
        yield url


@pytest.fixture
def kafka_topic(request: pytest.FixtureRequest, _topics_to_delete: list[str]) -> str:
    name = f"test-{unique_suffix(request)}"
    _topics_to_delete.append(name)
    return name


@pytest.fixture
def redis_prefix(request: pytest.FixtureRequest) -> str:
    return f"test:{unique_suffix(request)}:"


@pytest.fixture
async def redis_client(redis_url: str, redis_prefix: str) -> AsyncIterator[aioredis.Redis]:
    client = make_redis(SETTINGS, decode_responses=True)
    try:
        yield client
    finally:
        try:
            keys = [k async for k in client.scan_iter(match=f"{redis_prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
