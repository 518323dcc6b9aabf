"""`lodestar dispatcher`: route requests from `lodestar.requests` to worker topics."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import typer

from app.commands.connection import connection_overrides
from lodestar.logs import setup_logging
from lodestar.settings import Settings, load_settings


def dispatcher(
    policy: str | None = typer.Option(None, help="Routing policy (`lodestar bench policies` lists them; their "
                                                 "parameters: setting dispatcher.policy_params)."),
    dispatcher_id: str | None = typer.Option(None, "--id", help="Id recorded in decisions (default host-pid)."),
    bootstrap_servers: str | None = typer.Option(None, help="Kafka bootstrap servers (overrides settings)."),
    redis_url: str | None = typer.Option(None, help="Redis URL (overrides settings)."),
) -> None:
    """Consume requests in batches, route each to a live worker, publish, commit. SIGTERM/SIGINT stop it."""
    from dispatcher.policies.registry import check_params_by_policy, policy_class, policy_names

    section: dict[str, Any] = {}
    if policy:
        if policy not in policy_names():
            raise typer.BadParameter(f"unknown policy {policy!r}; known: {', '.join(policy_names())}",
                                     param_hint="--policy")
        section["policy"] = policy
    if dispatcher_id:
        section["dispatcher_id"] = dispatcher_id
    overrides: dict[str, Any] = {"dispatcher": section} if section else {}
    overrides.update(connection_overrides(bootstrap_servers, redis_url))
    settings = load_settings(**overrides)
    try:  # the settings' policy and every policy's parameters, before anything connects
        policy_class(settings.dispatcher.policy)
        check_params_by_policy(settings.dispatcher.policy_params)
    except (KeyError, ValueError) as err:
        typer.echo(f"lodestar dispatcher: {err}", err=True)
        raise typer.Exit(2) from None
    setup_logging("dispatcher", settings.telemetry)
    asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> None:
    from dispatcher.service import Dispatcher, default_dispatcher_id
    from lodestar.metrics import DispatcherMetrics, start_metrics_server
    from lodestar.tracing import setup_tracing

    dispatcher_id = settings.dispatcher.dispatcher_id or default_dispatcher_id()
    provider = setup_tracing("dispatcher", settings.telemetry, instance_id=dispatcher_id)
    metrics = DispatcherMetrics()
    service = Dispatcher(settings, dispatcher_id=dispatcher_id, metrics=metrics)
    server = start_metrics_server(metrics.registry, settings.dispatcher.metrics_port, settings.telemetry.metrics_host,
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
