"""`lodestar gateway`: the OpenAI-compatible HTTP front door onto the pipeline."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import typer

from app.commands.connection import connection_overrides
from app.commands.event_loop import run_service
from lodestar.logs import setup_logging
from lodestar.settings import Settings, load_settings


def gateway(
    gateway_id: str | None = typer.Option(None, "--id", help="Gateway id: names its reply topic (default host-pid)."),
    host: str | None = typer.Option(None, help="Address to bind (setting gateway.host)."),
    port: int | None = typer.Option(None, help="HTTP port (setting gateway.port)."),
    model_name: str | None = typer.Option(None, help="The served model's name (setting gateway.model_name)."),
    bootstrap_servers: str | None = typer.Option(None, help="Kafka bootstrap servers (overrides settings)."),
    redis_url: str | None = typer.Option(None, help="Redis URL (overrides settings)."),
) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /generate from the pipeline; the first
    SIGTERM/SIGINT finishes the answers under way and exits, a second one stops at once."""
    section: dict[str, Any] = {}
    for key, value in (("gateway_id", gateway_id), ("host", host), ("port", port), ("model_name", model_name)):
        if value is not None:
            section[key] = value
    overrides: dict[str, Any] = {"gateway": section} if section else {}
    overrides.update(connection_overrides(bootstrap_servers, redis_url))
    settings = load_settings(**overrides)
    setup_logging("gateway", settings.telemetry)
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
    try:
        run_service(_serve(settings))
    except ValueError as err:  # e.g. no API key configured
        typer.echo(f"lodestar gateway: {err}", err=True)
        raise typer.Exit(2) from None


async def _serve(settings: Settings) -> None:
    from gateway.http import create_app
    from gateway.service import GatewayService, default_gateway_id
    from lodestar.tracing import setup_tracing

    gateway_id = settings.gateway.gateway_id or default_gateway_id()
    settings = settings.model_copy(update={"gateway": settings.gateway.model_copy(update={"gateway_id": gateway_id})})
    provider = setup_tracing("gateway", settings.telemetry, instance_id=gateway_id)
    try:
        service = GatewayService(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, service.request_stop)
        await service.run(create_app(service))
    finally:
        provider.shutdown()
