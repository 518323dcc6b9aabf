"""`lodestar topics create`: create the fixed topics with their configured partitions."""

from __future__ import annotations

import asyncio

import typer
from rich.console import Console

from app.commands.connection import connection_overrides
from lodestar.kafka_admin import ensure_topics, fixed_topic_partitions
from lodestar.settings import load_settings

app = typer.Typer(no_args_is_help=True, help="Manage Lodestar's Kafka topics.")


@app.command("create")
def create(
    bootstrap_servers: str | None = typer.Option(None, help="Kafka bootstrap servers (overrides settings)."),
) -> None:
    """Create lodestar.requests/results/telemetry/dlq (idempotent)."""
    settings = load_settings(**connection_overrides(bootstrap_servers))
    wanted = fixed_topic_partitions(settings)
    outcome = asyncio.run(ensure_topics(settings, wanted))
    console = Console()
    for name, parts in wanted.items():
        console.print(f"{name:30s} partitions={parts:<3d} {outcome[name]}")


@app.callback()
def _main() -> None:
    """Topic management."""
