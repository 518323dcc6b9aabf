"""Readiness over the real broker and Redis: a dispatcher's /readyz turns 200 once it has joined its consumer
group and settled its model (here: no snapshot, so the fallback is declared), including a dispatcher left
idle because the group has more members than the requests topic has partitions."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from dispatcher_harness import dispatch_settings
from worker_harness import cleanup

from dispatcher.service import Dispatcher
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.metrics import MetricsServer, start_metrics_server
from lodestar.settings import Settings

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def probed_dispatcher(settings: Settings, dispatcher_id: str) -> AsyncIterator[tuple[Dispatcher, str]]:
    """A dispatcher served with its probes as `lodestar dispatcher` serves it, and the probes' base URL;
    not started until the caller does."""
    service = Dispatcher(settings, dispatcher_id=dispatcher_id)
    server: MetricsServer | None = start_metrics_server(service.metrics.registry, _free_port(), health=service.health)
    assert server is not None
    try:
        yield service, f"http://127.0.0.1:{server.port}"
    finally:
        server.close()


async def _readyz(http: httpx.AsyncClient, base: str) -> httpx.Response:
    return await http.get(f"{base}/readyz")


async def test_readyz_turns_ready_once_the_dispatcher_joined_its_group(kafka_bootstrap: str, redis_url: str) -> None:
    settings = dispatch_settings(policy="learned")  # the requests topic has 2 partitions
    await ensure_topics(settings, fixed_topic_partitions(settings))
    stop = asyncio.Event()
    try:
        async with (
            httpx.AsyncClient(timeout=5) as http,
            probed_dispatcher(settings, "d1") as (d1, base1),
            probed_dispatcher(settings, "d2") as (d2, base2),
            probed_dispatcher(settings, "d3") as (d3, base3),
        ):
            before = await _readyz(http, base1)
            assert before.status_code == 503
            assert before.json()["conditions"]["group"] == {"ready": False, "detail": "not yet"}
            assert (await http.get(f"{base1}/healthz")).status_code == 200

            tasks = [asyncio.create_task(d.run(stop)) for d in (d1, d2, d3)]
            states: dict[str, httpx.Response] = {}

            async def poll() -> None:
                for base in (base1, base2, base3):
                    states[base] = await _readyz(http, base)

            deadline = asyncio.get_running_loop().time() + 60
            while True:
                await poll()
                if all(r.status_code == 200 for r in states.values()) and sum(
                        len(d.assigned_partitions()) for d in (d1, d2, d3)) == 2:
                    break
                for task in tasks:
                    if task.done():
                        task.result()
                if asyncio.get_running_loop().time() > deadline:
                    pytest.fail(f"not every dispatcher became ready: {[r.json() for r in states.values()]}")
                await asyncio.sleep(0.2)

            bodies = [states[b].json() for b in (base1, base2, base3)]
            for body in bodies:
                assert body["ready"] is True
                assert body["conditions"]["model"]["detail"] == (
                    "no model snapshot yet: routing with the fallback analytic")
                assert body["conditions"]["group"]["detail"].startswith(
                    f"member of group {settings.dispatcher.consumer_group} with ")
            idle = [d for d in (d1, d2, d3) if not d.assigned_partitions()]
            assert len(idle) == 1  # three members, two partitions: one idles, and is ready all the same
            stop.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        stop.set()
        await cleanup(settings)
