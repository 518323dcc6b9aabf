"""What Kafka SASL_SSL and Redis TLS with an ACL user cost against plaintext, on the same broker and Redis.

    scripts/services start --secure
    .venv/bin/python scripts/bench_security.py [--round-trips 300] [--messages 5000] [--repeats 3]

Both endpoints of one server are measured alternately, `--repeats` times each, through Lodestar's own
client factories (lodestar/kafka_io.py, lodestar/redis_io.py), and the medians printed with the host load:
- Kafka connect: a producer and a consumer started and the topic's partitions known (TLS handshakes and
  SCRAM logins included);
- Kafka round trip: one 1 KB message sent (acks=all, idempotent) and read back, one after another, p50/p99;
- Kafka throughput: `--messages` 1 KB messages produced in batches, then consumed;
- Redis connect + PING, and sequential HSET+HGET round trips, p50/p99.
The secure endpoints and the plaintext ones beside them come from the env files of
`scripts/services start --secure` ($LODESTAR_SECURE_ENV_DIR, default .run/secure).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import TopicPartition  # noqa: E402

from app.local_services import read_env_file, secure_env_dir, settings_from_env  # noqa: E402
from lodestar.kafka_admin import ensure_topics  # noqa: E402
from lodestar.kafka_io import make_admin, make_consumer, make_producer  # noqa: E402
from lodestar.redis_io import make_redis  # noqa: E402
from lodestar.settings import Settings  # noqa: E402

PAYLOAD = b"x" * 1024


def endpoints() -> dict[str, Settings]:
    """The plaintext and the secure endpoints of one broker and one Redis."""
    folder = secure_env_dir()
    env = {**read_env_file(folder / "kafka.env"), **read_env_file(folder / "redis.env")}
    plain = Settings(kafka={"bootstrap_servers": env["LODESTAR_SERVICES_KAFKA_PLAINTEXT_BOOTSTRAP"]},
                     redis={"url": env["LODESTAR_SERVICES_REDIS_PLAINTEXT_URL"]})
    return {"plaintext": plain, "secure": settings_from_env(env)}


def quantile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q * 100) - 1]


async def kafka_once(settings: Settings, topic: str, round_trips: int, messages: int) -> dict[str, float]:
    t0 = time.perf_counter()
    producer = make_producer(settings, client_id="bench-security")
    consumer = make_consumer(settings, group_id=None, client_id="bench-security")
    await producer.start()
    await consumer.start()
    partition = TopicPartition(topic, 0)
    await producer.partitions_for(topic)
    connect_ms = (time.perf_counter() - t0) * 1000
    try:
        consumer.assign([partition])
        await consumer.seek_to_end(partition)
        await consumer.position(partition)
        latencies = []
        for _ in range(round_trips):
            t = time.perf_counter()
            await producer.send_and_wait(topic, PAYLOAD, partition=0)
            await consumer.getone()
            latencies.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        for start in range(0, messages, 500):
            await asyncio.gather(*[await producer.send(topic, PAYLOAD, partition=0)
                                   for _ in range(min(500, messages - start))])
        produce_s = time.perf_counter() - t
        t, got = time.perf_counter(), 0
        while got < messages:
            batch = await consumer.getmany(partition, timeout_ms=1000, max_records=2000)
            got += sum(map(len, batch.values()))
        consume_s = time.perf_counter() - t
    finally:
        await consumer.stop()
        await producer.stop()
    return {"kafka connect ms": connect_ms, "kafka round trip p50 ms": quantile(latencies, 0.5),
            "kafka round trip p99 ms": quantile(latencies, 0.99), "kafka produce msg/s": messages / produce_s,
            "kafka consume msg/s": messages / consume_s}


async def redis_once(settings: Settings, round_trips: int) -> dict[str, float]:
    t0 = time.perf_counter()
    client = make_redis(settings)
    try:
        await client.ping()
        connect_ms = (time.perf_counter() - t0) * 1000
        key = f"lodestar:bench-security:{uuid.uuid4().hex[:8]}"
        latencies = []
        for i in range(round_trips):
            t = time.perf_counter()
            await client.hset(key, "n", i)
            await client.hget(key, "n")
            latencies.append((time.perf_counter() - t) * 1000)
        await client.delete(key)
    finally:
        await client.aclose()
    return {"redis connect+PING ms": connect_ms, "redis HSET+HGET p50 ms": quantile(latencies, 0.5),
            "redis HSET+HGET p99 ms": quantile(latencies, 0.99)}


async def main(args: argparse.Namespace) -> None:
    modes = endpoints()
    topic = f"bench-security-{uuid.uuid4().hex[:8]}"
    await ensure_topics(modes["plaintext"], {topic: 1})
    runs: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    print(f"load before: {Path('/proc/loadavg').read_text().strip()}")
    try:
        for _ in range(args.repeats):
            for mode, settings in modes.items():
                kafka = await kafka_once(settings, topic, args.round_trips, args.messages)
                runs[mode].append({**kafka, **await redis_once(settings, args.round_trips)})
    finally:
        admin = make_admin(modes["plaintext"])
        await admin.start()
        try:
            await admin.delete_topics([topic])
        finally:
            await admin.close()
    print(f"load after:  {Path('/proc/loadavg').read_text().strip()}")
    print(f"medians of {args.repeats} runs each (round trips {args.round_trips}, messages {args.messages} x 1 KB)")
    print(f"{'':28} {'plaintext':>10} {'secure':>10} {'secure/plain':>13}")
    for metric in runs["plaintext"][0]:
        plain = statistics.median(r[metric] for r in runs["plaintext"])
        secure = statistics.median(r[metric] for r in runs["secure"])
        print(f"{metric:28} {plain:10.2f} {secure:10.2f} {secure / plain:12.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--round-trips", type=int, default=300)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    asyncio.run(main(parser.parse_args()))
