"""End to end over the secure endpoints of `scripts/services start --secure`: Kafka through its SASL_SSL
listener (TLS verified against the CA made at start, SCRAM-SHA-512) with each service as its own principal,
held by the broker's authorizer to exactly the ACLs of lodestar/kafka_acls.py; Redis through its TLS port as
the ACL user `lodestar`; engines (emulators) that require an API key; snapshots signed with a key of the
run's own. The emulators, a worker per engine, the learner, a dispatcher and a gateway run as `lodestar`
processes (the same bring-up as `lodestar up`), the requests go through the client library as the client
principal and through the gateway's HTTP API (the gateway as its own principal, `lodestar-gateway`).
Beside that: what the endpoints refuse (a wrong password, an unknown CA, a topic outside a principal's
ACLs, a key outside the Redis ACL, a missing API key).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import secrets
import ssl
import subprocess
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
import pytest_asyncio
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError, TopicAuthorizationFailedError
from kafka_acl_harness import grant
from pydantic import SecretStr
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError
from stack_harness import Pipeline, Run, engines, running_pipeline, shared_prefix_requests, two_waves
from worker_harness import TopicReader

from app.local_services import settings_from_env
from app.local_stack import DISPATCHERS, GATEWAYS, LEARNER, WORKERS, start_gateways
from gateway.auth import key_digest
from lodestar.kafka_acls import service_acls
from lodestar.kafka_admin import ensure_topics
from lodestar.kafka_io import make_admin, make_consumer, make_producer
from lodestar.redis_io import make_redis
from lodestar.settings import Settings
from lodestar.snapshot import SigningKey
from lodestar.snapshot_store import SnapshotStore
from sim.cluster import WorkerSpec

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DISPATCHER = "sec-1"
GATEWAY = "sec-g1"
DELETING_GATEWAY = "sec-g2"  # told to delete its reply topic when it stops (the Helm chart's setting)
ENGINE_KEY = secrets.token_hex(16)
GATEWAY_KEY = f"sk-{secrets.token_hex(16)}"
WAVE_1, WAVE_2 = 30, 20


def secure_settings(env: dict[str, str], checkpoint: Path) -> Settings:
    """The secure endpoints, with topics, keys (inside the ACL user's `lodestar:*`), groups, snapshot key and
    engine API key of this module's own."""
    tag = uuid.uuid4().hex[:8]
    return settings_from_env(
        env,
        kafka={"topic_prefix": f"sec{tag}.", "request_partitions": 2, "results_partitions": 2,
               "telemetry_partitions": 1},
        redis={"key_prefix": f"lodestar:sec{tag}:"},
        dispatcher={"consumer_group": f"sec{tag}-dispatchers", "policy": "learned"},
        learner={"consumer_group": f"sec{tag}-learner", "checkpoint_path": checkpoint, "model": "river",
                 "snapshot_every_events": 10, "warmup_snapshot_every_events": 10, "snapshot_every_s": 1.0},
        worker={"state_ttl_s": 2.0, "engine_api_key": ENGINE_KEY},
        gateway={"gateway_id": GATEWAY},
        snapshot_signing={"key_id": f"sec{tag}", "key": secrets.token_hex(32)},
    )


def as_principal(settings: Settings, service: str) -> Settings:
    """The same settings, logged in to Kafka as the service's own principal (the dev password is shared)."""
    return _with(settings, "kafka", sasl_username=f"lodestar-{service}")


async def check_logins(settings: Settings, services: tuple[str, ...]) -> None:
    """Fail, saying what to do, if the broker has no SCRAM user for one of these principals (its storage was
    formatted before scripts/services added the user)."""
    for service in services:
        admin = make_admin(as_principal(settings, service), request_timeout_ms=10_000)
        try:
            await asyncio.wait_for(admin.start(), 30)
        except (KafkaError, OSError, TimeoutError) as e:
            pytest.fail(f"cannot log in to {settings.kafka.bootstrap_servers} as lodestar-{service} ({e!r}): was the "
                        "broker's storage formatted before scripts/services added that SCRAM user? Start services "
                        "with a fresh storage (see docs/security.md), or point LODESTAR_SECURE_ENV_DIR at such a pair",
                        pytrace=False)
        finally:
            await admin.close()


async def grant_every_service(settings: Settings, cluster: list[WorkerSpec]) -> None:
    """lodestar/kafka_acls.py's ACLs for each service's principal, under these settings' names."""
    await grant(settings, "User:lodestar-dispatcher", service_acls(settings, "dispatcher"))
    await grant(settings, "User:lodestar-learner", service_acls(settings, "learner"))
    await grant(settings, "User:lodestar-client", service_acls(settings, "client"))
    await grant(settings, "User:lodestar-gateway", service_acls(settings, "gateway"))  # for gateway.gateway_id
    for engine in cluster:
        await grant(settings, "User:lodestar-worker", service_acls(settings, "worker", worker_id=engine.worker_id))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipeline(secure_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("secure-pipeline")
    settings = secure_settings(secure_env, tmp / "learner.json")  # the super user: topics, probes, readers
    assert settings.kafka.security_protocol == "SASL_SSL" and settings.redis.uses_tls and settings.redis.username
    cluster = engines("H100", "L4")
    await check_logins(settings, ("dispatcher", "worker", "learner", "gateway", "client"))
    await grant_every_service(settings, cluster)
    engine_env = {"LODESTAR_EMULATOR_API_KEY": ENGINE_KEY,
                  "LODESTAR_WORKER__ENGINE_API_KEY": ENGINE_KEY}
    principals = {group: {"LODESTAR_KAFKA__SASL_USERNAME": f"lodestar-{service}"}
                  for group, service in ((WORKERS, "worker"), (LEARNER, "learner"), (DISPATCHERS, "dispatcher"),
                                         (GATEWAYS, "gateway"))}
    async with running_pipeline(settings, tmp / "logs", cluster, [DISPATCHER], "learned", time_scale=0.2,
                                extra_env=engine_env, group_env=principals) as pipeline:
        yield pipeline


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(pipeline: Pipeline) -> str:
    """The gateway GATEWAY in front of the pipeline, logged in to Kafka as `lodestar-gateway` (the pipeline's
    group environment) and accepting GATEWAY_KEY; its base URL. It stops with the pipeline."""
    env = {"LODESTAR_GATEWAY__API_KEY_HASHES": json.dumps([key_digest(GATEWAY_KEY)])}
    urls = await start_gateways(pipeline.stack, pipeline.probes, [GATEWAY], env, timeout_s=120)
    return urls[GATEWAY]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(pipeline: Pipeline) -> Run:
    waves = [shared_prefix_requests(WAVE_1, 6, tag="sec1"), shared_prefix_requests(WAVE_2, 6, tag="sec2")]
    return await two_waves(pipeline, waves, rate_per_s=20, client_settings=as_principal(pipeline.settings, "client"))


async def test_every_request_is_answered_once_over_sasl_ssl_and_tls_redis(run: Run) -> None:
    assert [a.request_id if a else None for a in run.answers] == run.sent
    assert all(a is not None and a.status == "ok" and a.completion_tokens == 6 for a in run.answers)
    assert Counter(r.request_id for r in run.results_on_topic) == Counter(run.sent)
    assert run.duplicates_seen_by_client == 0
    assert sorted(run.telemetry) == sorted(run.sent)


async def test_the_signed_snapshot_travels_through_tls_redis_to_the_dispatcher(run: Run) -> None:
    assert run.snapshot_version >= 1
    versions = [run.telemetry[r.request_id].decision.model_version for r in run.waves[1]]
    assert min(versions) >= 1, Counter(versions)


async def test_the_services_hold_their_redis_connections_as_the_acl_user_on_the_tls_port(
        run: Run, pipeline: Pipeline, secure_env: dict[str, str]) -> None:
    # CLIENT LIST needs an admin right the ACL user lacks: ask the same server's plaintext port as its default user
    plaintext = secure_env["LODESTAR_SERVICES_REDIS_PLAINTEXT_URL"]
    admin = make_redis(Settings(redis={"url": plaintext}), decode_responses=True)
    try:
        clients = await admin.client_list()
    finally:
        await admin.aclose()
    port = pipeline.settings.redis.url.rsplit(":", 1)[1].split("/")[0]
    ours = [c for c in clients if c.get("user") == "lodestar"]
    assert ours, "no connection logged in as the ACL user"
    assert {c["laddr"].rsplit(":", 1)[1] for c in ours} == {port}  # every one of them on the TLS port
    # the dispatcher's snapshot watcher subscribes to its announcement channel as that user
    assert any(int(c.get("sub", 0)) >= 1 for c in ours)


async def test_the_engines_refuse_a_request_without_their_api_key(pipeline: Pipeline) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        for url in pipeline.urls.values():
            assert (await http.get(f"{url}/v1/loads")).status_code == 401
            assert (await http.get(f"{url}/v1/loads", headers={"Authorization": f"Bearer {ENGINE_KEY}"})
                    ).status_code == 200
            assert (await http.get(f"{url}/health")).status_code == 200
    assert "emulator" in await pipeline.probes.engine_info(next(iter(pipeline.urls.values())))  # sends the key


async def test_the_gateway_answers_chat_as_its_own_principal(gateway: str, pipeline: Pipeline) -> None:
    environ = Path(f"/proc/{pipeline.stack[f'gateway-{GATEWAY}'].pid}/environ").read_bytes().split(b"\0")
    assert b"LODESTAR_KAFKA__SASL_USERNAME=lodestar-gateway" in environ  # not the super user `lodestar`
    model = pipeline.settings.gateway.model_name
    messages = [{"role": "user", "content": "Name a colour."}]
    client = openai.AsyncOpenAI(api_key=GATEWAY_KEY, base_url=f"{gateway}/v1", timeout=60, max_retries=0)
    answer = await client.chat.completions.create(model=model, messages=messages, max_tokens=6)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 6
    stream = await client.chat.completions.create(model=model, messages=messages, max_tokens=8, stream=True,
                                                  stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]
    await client.close()
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    # both came back on the gateway's own reply topic, which it read as `lodestar-gateway`
    ids = {answer.id.removeprefix("chatcmpl-"), chunks[0].id.removeprefix("chatcmpl-")}
    reply_topic = pipeline.topics.reply(GATEWAY)
    async with TopicReader(pipeline.settings, reply_topic) as reader:
        await reader.wait_for(lambda m: ids <= {r["request_id"] for r in m[reply_topic] if r.get("kind") != "chunk"},
                              timeout=30)


async def test_the_acl_user_is_confined_to_lodestar_keys_and_safe_commands(pipeline: Pipeline) -> None:
    client = make_redis(pipeline.settings, decode_responses=True)
    try:
        assert await client.acl_whoami() == "lodestar"
        with pytest.raises(NoPermissionError):
            await client.set("not-lodestar:key", "x")
        with pytest.raises(NoPermissionError):
            await client.flushall()
        # and a snapshot signed with another key is refused by a verifier holding the run's key
        forged = SnapshotStore(client, pipeline.probes._keys,  # noqa: SLF001 - the probes' own key names
                               signing_key=SigningKey(pipeline.settings.snapshot_signing.key_id, b"f" * 32))
        current = await pipeline.probes.snapshot()
        assert current is not None
        await forged.publish(dataclasses.replace(current, version=current.version + 1000))
        with pytest.raises(Exception, match="signature does not match"):
            await pipeline.probes.snapshot()
    finally:
        await client.aclose()


def _with(settings: Settings, section: str, **changes: object) -> Settings:
    return settings.model_copy(update={section: getattr(settings, section).model_copy(update=changes)})


def other_ca(tmp_path: Path) -> Path:
    """A CA that signed nothing of ours."""
    key, pem = tmp_path / "other-ca.key", tmp_path / "other-ca.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-keyout", str(key), "-out", str(pem), "-days", "1", "-subj", "/CN=not ours"],
                   check=True, capture_output=True)
    return pem


async def test_kafka_takes_the_right_login_and_a_client_certificate(secure_env: dict[str, str]) -> None:
    settings = settings_from_env(secure_env)
    folder = settings.kafka.ssl_cafile.parent
    mutual = _with(settings, "kafka", ssl_certfile=folder / "client.pem", ssl_keyfile=folder / "client.key")
    for good in (settings, mutual):  # the hostname is checked too: 127.0.0.1 is in the certificate
        admin = make_admin(good, request_timeout_ms=10_000)
        await asyncio.wait_for(admin.start(), 30)
        assert (await admin.describe_cluster())["brokers"]
        await admin.close()


async def test_kafka_refuses_a_wrong_password_and_an_unknown_ca(secure_env: dict[str, str], tmp_path: Path) -> None:
    settings = settings_from_env(secure_env)
    for bad in (_with(settings, "kafka", sasl_password=SecretStr("not-the-password")),
                _with(settings, "kafka", ssl_cafile=other_ca(tmp_path))):
        admin = make_admin(bad, request_timeout_ms=5_000)
        with pytest.raises((KafkaError, ssl.SSLError, OSError)):
            await asyncio.wait_for(admin.start(), 30)
        await admin.close()


async def test_redis_takes_a_client_certificate(secure_env: dict[str, str]) -> None:
    settings = settings_from_env(secure_env)
    folder = settings.redis.ssl_cafile.parent
    client = make_redis(_with(settings, "redis", ssl_certfile=folder / "client.pem", ssl_keyfile=folder / "client.key"))
    try:
        assert await client.ping()
    finally:
        await client.aclose()


async def test_redis_refuses_a_wrong_password_an_unknown_ca_and_plaintext(secure_env: dict[str, str],
                                                                          tmp_path: Path) -> None:
    settings = settings_from_env(secure_env)
    cases = [
        (_with(settings, "redis", password=SecretStr("not-the-password")), AuthenticationError),
        (_with(settings, "redis", ssl_cafile=other_ca(tmp_path)), RedisConnectionError),
        (_with(settings, "redis", url=settings.redis.url.replace("rediss://", "redis://"), ssl_cafile=None),
         RedisConnectionError),
    ]
    for bad, error in cases:
        client = make_redis(bad, socket_connect_timeout=5, socket_timeout=5)
        with pytest.raises(error):
            await client.ping()
        await client.aclose()


@pytest.mark.parametrize(("service", "may_not_read", "may_not_write"), [
    # each may Describe (or Write) the topic it may not read: the broker answers it, and refuses the read
    ("client", "requests", "worker"), ("learner", "requests", "results"), ("dispatcher", "telemetry", "telemetry"),
    ("worker", "requests", "requests"),
    ("gateway", "requests", "results"),
])
async def test_each_principal_is_held_to_its_acls(pipeline: Pipeline, service: str, may_not_read: str,
                                                  may_not_write: str) -> None:
    topics = pipeline.topics
    names = {"telemetry": topics.telemetry, "requests": topics.requests, "results": topics.results,
             "worker": topics.worker("h100-0")}
    settings = as_principal(pipeline.settings, service)
    consumer = make_consumer(settings, group_id=None, client_id=f"test-acl-{service}")
    await consumer.start()
    try:
        forbidden = TopicPartition(names[may_not_read], 0)
        consumer.assign([forbidden])
        await consumer.seek_to_beginning(forbidden)
        with pytest.raises(TopicAuthorizationFailedError):
            async with asyncio.timeout(30):
                while True:
                    await consumer.getmany(timeout_ms=500)
    finally:
        await consumer.stop()
    producer = make_producer(settings, client_id=f"test-acl-{service}")
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(producer.send_and_wait(names[may_not_write], b"{}"), 30)
    finally:
        await producer.stop()


async def test_a_gateway_may_not_even_see_another_gateways_reply_topic(pipeline: Pipeline) -> None:
    """Its rights are on its own reply topic only: another's is refused at the metadata (no Describe), so it can
    neither read that gateway's answers nor slip answers into them."""
    other = pipeline.topics.reply(f"{GATEWAY}-other")
    await ensure_topics(pipeline.settings, {other: 1})  # it exists: what is refused is the gateway's right to it
    settings = as_principal(pipeline.settings, "gateway")
    admin = make_admin(settings, client_id="test-acl-gateway")
    await admin.start()
    try:
        (described,) = await admin.describe_topics([other])
    finally:
        await admin.close()
    assert (described["topic"], described["error_code"]) == (other, TopicAuthorizationFailedError.errno)
    producer = make_producer(settings, client_id="test-acl-gateway")
    await producer.start()
    try:
        with pytest.raises(TopicAuthorizationFailedError):
            await asyncio.wait_for(producer.send_and_wait(other, b"{}"), 30)
    finally:
        await producer.stop()


async def test_a_gateway_told_to_delete_its_reply_topic_may_and_does_when_it_stops(pipeline: Pipeline) -> None:
    """`gateway.delete_reply_topic` adds Delete on its own reply topic to the gateway's ACLs; a gateway running
    under exactly those ACLs removes the topic on its way out (a failure there is only logged, so the test
    looks at the broker)."""
    settings = _with(pipeline.settings, "gateway", gateway_id=DELETING_GATEWAY, delete_reply_topic=True)
    acls = service_acls(settings, "gateway")
    assert any("Delete" in acl.operations for acl in acls)
    await grant(pipeline.settings, "User:lodestar-gateway", acls)
    env = {"LODESTAR_GATEWAY__DELETE_REPLY_TOPIC": "true",
           "LODESTAR_GATEWAY__API_KEY_HASHES": json.dumps([key_digest(GATEWAY_KEY)])}
    await start_gateways(pipeline.stack, pipeline.probes, [DELETING_GATEWAY], env, timeout_s=120)
    reply = pipeline.topics.reply(DELETING_GATEWAY)
    admin = make_admin(pipeline.settings, client_id="test-deleted-reply")
    await admin.start()
    try:
        assert reply in await admin.list_topics()  # created at start, as its own principal
        statuses = await asyncio.to_thread(pipeline.stack.stop, [f"gateway-{DELETING_GATEWAY}"])
        assert statuses == {f"gateway-{DELETING_GATEWAY}": 0}
        for _ in range(50):  # the broker deletes a topic asynchronously
            if reply not in await admin.list_topics():
                break
            await asyncio.sleep(0.2)
        assert reply not in await admin.list_topics()
    finally:
        await admin.close()
