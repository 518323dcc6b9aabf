"""Every Kafka and Redis client in the project comes from one factory each (lodestar/kafka_io.py,
lodestar/redis_io.py), so the broker's and Redis's security settings reach every connection: no other
module constructs a client itself (checked on the syntax tree of every Python file we ship or run)."""

from __future__ import annotations

import ast
from pathlib import Path

from lodestar.settings import PROJECT_ROOT

FACTORIES = {Path("lodestar/kafka_io.py"), Path("lodestar/redis_io.py")}
KAFKA_CLIENTS = {"AIOKafkaProducer", "AIOKafkaConsumer", "AIOKafkaAdminClient", "KafkaProducer", "KafkaConsumer"}
REDIS_CLIENTS = {"Redis", "StrictRedis", "ConnectionPool", "BlockingConnectionPool", "from_url"}
ROOTS = ("lodestar", "app", "dispatcher", "workers", "learner", "sim", "scripts", "tests")


def dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return ""


def client_constructions(source: str) -> list[str]:
    """The calls in `source` that make a Kafka or Redis client directly, as 'line: name'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            name = dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if last in KAFKA_CLIENTS or (last in REDIS_CLIENTS and ("redis" in name.lower() or last == "from_url")):
                found.append(f"{node.lineno}: {name}")
    return found


def python_files() -> list[Path]:
    return [p for root in ROOTS for p in (PROJECT_ROOT / root).rglob("*.py")]


def test_no_module_but_the_factories_makes_a_kafka_or_redis_client() -> None:
    offenders = {}
    for path in python_files():
        rel = path.relative_to(PROJECT_ROOT)
        if rel in FACTORIES:
            continue
        found = client_constructions(path.read_text())
        if found:
            offenders[str(rel)] = found
    assert offenders == {}, f"make clients with lodestar.kafka_io / lodestar.redis_io instead: {offenders}"


def test_the_check_sees_each_way_of_making_a_client() -> None:
    source = """
import redis, redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
AIOKafkaProducer(bootstrap_servers="x")
aiokafka.AIOKafkaConsumer("t")
AIOKafkaAdminClient()
aioredis.from_url("redis://x")
redis.Redis(host="x")
aioredis.BlockingConnectionPool.from_url("redis://x")
"""
    assert len(client_constructions(source)) == 6
    assert client_constructions("make_producer(settings, 'x')\nmake_redis(settings)\n") == []
    assert {PROJECT_ROOT / f for f in FACTORIES} <= set(python_files())  # the walk covers the project
