"""`lodestar learner`: learn TTFT online from telemetry and publish model snapshots."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import typer

from app.commands.connection import connection_overrides
from lodestar.logs import setup_logging
from lodestar.settings import Settings, load_settings


def learner(
    model: str | None = typer.Option(None, help="Model family, a module of learner/models/ (default from "
                                                "settings: learner.model)."),
    checkpoint_path: Path | None = typer.Option(None, help="Where the learner's state is saved (JSON)."),
    bootstrap_servers: str | None = typer.Option(None, help="Kafka bootstrap servers (overrides settings)."),
    redis_url: str | None = typer.Option(None, help="Redis URL (overrides settings)."),
) -> None:
    """Consume telemetry, learn, publish signed snapshots, checkpoint. SIGTERM/SIGINT checkpoint and stop."""
    section: dict[str, Any] = {}
    if model:
        from learner.models.registry import model_families

        if model not in model_families():
            raise typer.BadParameter(f"unknown model {model!r}; known: {', '.join(model_families())}",
                                     param_hint="--model")
        section["model"] = model
    if checkpoint_path:
        section["checkpoint_path"] = checkpoint_path
    overrides: dict[str, Any] = {"learner": section} if section else {}
    overrides.update(connection_overrides(bootstrap_servers, redis_url))
    settings = load_settings(**overrides)
    setup_logging("learner", settings.telemetry)
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    from learner.service import LearnerService
    from lodestar.metrics import LearnerMetrics, start_metrics_server
    from lodestar.tracing import setup_tracing

    provider = setup_tracing("learner", settings.telemetry)
    metrics = LearnerMetrics()
    service = LearnerService(settings, metrics=metrics)
    server = start_metrics_server(metrics.registry, settings.learner.metrics_port, settings.telemetry.metrics_host,
                                  health=service.health)
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await service.run(stop)
    finally:
        if server is not None:
            server.close()
        provider.shutdown()
