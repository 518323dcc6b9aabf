"""`lodestar worker`: run the worker service in front of one SGLang engine (or emulator)."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import typer

from app.commands.connection import connection_overrides
from lodestar.logs import setup_logging
from lodestar.settings import Settings, load_settings


def worker(
    worker_id: str = typer.Option(..., "--id", help="Worker id: names its topic, consumer group and registry entry."),
    sglang_url: str | None = typer.Option(None, help="Base URL of the SGLang engine, e.g. http://127.0.0.1:30000."),
    gpu_type: str | None = typer.Option(None, help="GPU type of the engine (H100, A100, L40S, ...)."),
    max_concurrency: int | None = typer.Option(None, min=1, help="Requests served at once."),
    bootstrap_servers: str | None = typer.Option(None, help="Kafka bootstrap servers (overrides settings)."),
    redis_url: str | None = typer.Option(None, help="Redis URL (overrides settings)."),
) -> None:
    """Serve the requests routed to this worker; SIGTERM/SIGINT drain it and exit 0."""
    worker_overrides: dict[str, Any] = {"worker_id": worker_id}
    for key, value in (("sglang_url", sglang_url), ("gpu_type", gpu_type), ("max_concurrency", max_concurrency)):
        if value is not None:
            worker_overrides[key] = value
    overrides: dict[str, Any] = {"worker": worker_overrides}
    overrides.update(connection_overrides(bootstrap_servers, redis_url))
    settings = load_settings(**overrides)
    setup_logging("worker", settings.telemetry)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call and load poll otherwise
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    from lodestar.metrics import WorkerMetrics, start_metrics_server
    from lodestar.tracing import setup_tracing
    from workers.service import WorkerService

    worker_id = settings.worker.worker_id
    provider = setup_tracing("worker", settings.telemetry, instance_id=worker_id)
    metrics = WorkerMetrics(worker_id)
    service = WorkerService(settings, metrics=metrics)
    server = start_metrics_server(metrics.registry, settings.worker.metrics_port, settings.telemetry.metrics_host,
                                  health=service.health)
    try:
        run = asyncio.create_task(service.run())
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            # The first signal drains; a second one stops at once (unfinished work is redelivered later).
            if service.state.draining:
                run.cancel()
            else:
                service.request_drain()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal)
        try:
            await run
        except asyncio.CancelledError:
            raise typer.Exit(130) from None
    finally:
        if server is not None:
            server.close()
        provider.shutdown()
