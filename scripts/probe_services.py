#!/usr/bin/env python3
"""Readiness probes for the services that scripts/services starts (Kafka, Redis).

Used by scripts/services; runs with the project's venv python when there is one, else any python3:
with Lodestar installed it asks through Lodestar's own clients (Kafka: admin DescribeCluster, Redis:
PING), without it it speaks just enough of each wire protocol itself, so `scripts/services start` also
works before `make setup`.

    probe_services.py kafka BOOTSTRAP [--timeout S] [--pid PID]   # wait until the broker answers (plaintext)
    probe_services.py redis URL       [--timeout S] [--pid PID]   # wait until PING answers PONG
    probe_services.py settings-kafka  [--timeout S] [--pid PID]   # the same, connecting and logging in as the
    probe_services.py settings-redis  [--timeout S] [--pid PID]   #   Lodestar settings say (TLS, SASL, ACL user)
    probe_services.py tcp HOST PORT                                # is anything listening there?
    probe_services.py kafka-cluster-id                             # a fresh id for `StorageTool format`

Exit codes: 0 answers, 1 did not answer within the timeout, 2 the watched --pid died first.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import re
import socket
import struct
import sys
import time
import uuid
from typing import Any
from urllib.parse import unquote, urlparse

ATTEMPT_TIMEOUT_S = 5.0
RETRY_PAUSE_S = 0.3


def split_hostport(addr: str, default_port: int) -> tuple[str, int]:
    addr = addr.strip()
    if addr.startswith("["):  # [::1]:9092
        host, _, rest = addr[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, sep, port = addr.rpartition(":")
    if not sep:
        return addr, default_port
    return host, int(port)


# --------------------------------------------------------------------------- kafka


def _kafka_request(sock: socket.socket, api_key: int, version: int, corr: int, body: bytes) -> bytes:
    client_id = b"lodestar-probe"
    header = struct.pack(">hhih", api_key, version, corr, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    size = struct.unpack(">i", _recv_exact(sock, 4))[0]
    resp = _recv_exact(sock, size)
    if struct.unpack(">i", resp[:4])[0] != corr:
        raise ConnectionError("kafka: correlation id mismatch")
    return resp[4:]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed")
        buf += chunk
    return buf


def kafka_raw_once(bootstrap: str) -> str:
    """ApiVersions v0 then Metadata v1 over a plain socket; needs no client library."""
    host, port = split_hostport(bootstrap.split(",")[0], 9092)
    with socket.create_connection((host, port), timeout=ATTEMPT_TIMEOUT_S) as sock:
        sock.settimeout(ATTEMPT_TIMEOUT_S)
        resp = _kafka_request(sock, 18, 0, 1, b"")  # ApiVersions v0
        err = struct.unpack(">h", resp[:2])[0]
        if err:
            raise ConnectionError(f"kafka ApiVersions error {err}")
        resp = _kafka_request(sock, 3, 1, 2, struct.pack(">i", 0))  # Metadata v1, no topics
        n_brokers = struct.unpack(">i", resp[:4])[0]
        if n_brokers < 1:
            raise ConnectionError("kafka answers but has no live broker yet")
        return f"{n_brokers} broker(s) (raw protocol probe)"


async def _kafka_lodestar_once(kafka: Any) -> str:
    from lodestar.kafka_io import make_admin

    admin = make_admin(kafka, client_id="lodestar-probe", request_timeout_ms=int(ATTEMPT_TIMEOUT_S * 1000))
    try:
        await asyncio.wait_for(admin.start(), ATTEMPT_TIMEOUT_S)
        info = await asyncio.wait_for(admin.describe_cluster(), ATTEMPT_TIMEOUT_S)
    finally:
        await admin.close()
    brokers = info.get("brokers") or []
    if not brokers:
        raise ConnectionError("kafka answers but has no live broker yet")
    how = f"{kafka.security_protocol}{f' as {kafka.sasl_username}' if kafka.uses_sasl else ''}"
    return (f"cluster {info.get('cluster_id')}, {len(brokers)} broker(s), controller {info.get('controller_id')}, "
            f"{how}")


def kafka_once(bootstrap: str) -> str:
    try:
        from lodestar.settings import KafkaSettings
    except ImportError:
        return kafka_raw_once(bootstrap)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return asyncio.run(_kafka_lodestar_once(KafkaSettings(bootstrap_servers=bootstrap)))


def settings_kafka_once(_: str) -> str:
    from lodestar.settings import Settings

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    return asyncio.run(_kafka_lodestar_once(Settings().kafka))


def new_kafka_cluster_id() -> str:
    """Same format as `kafka-storage.sh random-uuid`: url-safe base64 of 16 random bytes, no padding."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):  # Kafka refuses ids that look like command line flags
            return cid


# --------------------------------------------------------------------------- redis


def redis_raw_once(url: str) -> str:
    u = urlparse(url)
    host, port = u.hostname or "127.0.0.1", u.port or 6379
    with socket.create_connection((host, port), timeout=ATTEMPT_TIMEOUT_S) as sock:
        sock.settimeout(ATTEMPT_TIMEOUT_S)
        f = sock.makefile("rb")

        def cmd(*parts: str) -> bytes:
            out = f"*{len(parts)}\r\n".encode()
            for p in parts:
                b = p.encode()
                out += b"$%d\r\n%s\r\n" % (len(b), b)
            sock.sendall(out)
            return f.readline().rstrip(b"\r\n")

        if u.password:
            user = unquote(u.username) if u.username else None
            auth = cmd("AUTH", user, unquote(u.password)) if user else cmd("AUTH", unquote(u.password))
            if not auth.startswith(b"+OK"):
                raise ConnectionError(f"redis AUTH failed: {auth!r}")
        reply = cmd("PING")
        if reply != b"+PONG":
            raise ConnectionError(f"redis PING answered {reply!r}")
        return "PONG (raw protocol probe)"


async def _redis_lodestar_once(redis: Any) -> str:
    from lodestar.redis_io import make_redis

    client = make_redis(redis, socket_connect_timeout=ATTEMPT_TIMEOUT_S, socket_timeout=ATTEMPT_TIMEOUT_S)
    try:
        if not await client.ping():
            raise ConnectionError("redis PING did not answer PONG")
        hello = await client.execute_command("HELLO")  # the server's version, without INFO's admin right
        version = hello.get(b"version", b"?").decode() if isinstance(hello, dict) else "?"
        user = await client.acl_whoami()
        user = user.decode() if isinstance(user, bytes) else user
    finally:
        await client.aclose()
    return f"PONG, redis {version}, {'TLS' if redis.uses_tls else 'plaintext'} as user {user}"


def redis_once(url: str) -> str:
    try:
        from lodestar.settings import RedisSettings
    except ImportError:
        return redis_raw_once(url)
    return asyncio.run(_redis_lodestar_once(RedisSettings(url=url)))


def settings_redis_once(_: str) -> str:
    from lodestar.settings import Settings

    return asyncio.run(_redis_lodestar_once(Settings().redis))


# --------------------------------------------------------------------------- main


def masked(target: str) -> str:
    """The address without its password (redis://:secret@host -> redis://:***@host)."""
    return re.sub(r"(://[^:@/]*:)[^@/]*@", r"\1***@", target)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is dead for our purposes
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def wait(check, target: str, timeout: float, pid: int | None) -> int:
    deadline = time.monotonic() + timeout
    last = "no attempt made"
    while True:
        if pid is not None and not pid_alive(pid):
            print(f"process {pid} exited before {masked(target)} answered (last: {last})", file=sys.stderr)
            return 2
        try:
            print(check(target))
            return 0
        except Exception as exc:  # any failure means "not (yet) answering"
            text = str(exc) or repr(exc)
            last = text if text.startswith(type(exc).__name__) else f"{type(exc).__name__}: {text}"
        if time.monotonic() >= deadline:
            within = f" within {timeout:g}s" if timeout else ""
            print(f"{masked(target)} did not answer{within} (last: {last})", file=sys.stderr)
            return 1
        time.sleep(RETRY_PAUSE_S)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    for name, helptext in (("kafka", "bootstrap servers, host:port[,...]"), ("redis", "redis://host:port/db")):
        p = sub.add_parser(name)
        p.add_argument("target", help=helptext)
        p.add_argument("--timeout", type=float, default=0.0, help="keep trying this long (0 = one try)")
        p.add_argument("--pid", type=int, default=None, help="give up early if this process exits")
    for name in ("settings-kafka", "settings-redis"):
        p = sub.add_parser(name)
        p.add_argument("--timeout", type=float, default=0.0, help="keep trying this long (0 = one try)")
        p.add_argument("--pid", type=int, default=None, help="give up early if this process exits")
    p = sub.add_parser("tcp")
    p.add_argument("host")
    p.add_argument("port", type=int)
    sub.add_parser("kafka-cluster-id")
    args = ap.parse_args(argv)

    if args.what == "kafka-cluster-id":
        print(new_kafka_cluster_id())
        return 0
    if args.what == "tcp":
        try:
            with socket.create_connection((args.host, args.port), timeout=1.0):
                return 0
        except OSError:
            return 1
    check = {"kafka": kafka_once, "redis": redis_once, "settings-kafka": settings_kafka_once,
             "settings-redis": settings_redis_once}[args.what]
    return wait(check, getattr(args, "target", args.what), args.timeout, args.pid)


if __name__ == "__main__":
    sys.exit(main())
