"""`lodestar submit`: send one prompt through the pipeline and print its result as JSON."""

from __future__ import annotations

import asyncio
from typing import Any

import typer

from app.commands.connection import connection_overrides
from lodestar.client import LodestarClient
from lodestar.logs import setup_logging
from lodestar.schemas import InferenceResult, SamplingParams
from lodestar.settings import Settings, load_settings
from lodestar.tracing import setup_tracing


def submit(
    prompt: str = typer.Argument(..., help="The prompt text."),
    max_new_tokens: int = typer.Option(128, min=1, help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, min=0.0, help="Sampling temperature."),
    session: str | None = typer.Option(None, help="Session id: a session's requests share a partition."),
    timeout_s: float = typer.Option(120.0, "--timeout", help="Seconds to wait for the result."),
    bootstrap_servers: str | None = typer.Option(None, help="Kafka bootstrap servers (overrides settings)."),
) -> None:
    """Submit a prompt and print the InferenceResult (exit 1 if it did not come back in time).

    The request's trace starts here (service `client`), exported as the telemetry settings say."""
    overrides: dict[str, Any] = {}
    overrides.update(connection_overrides(bootstrap_servers))
    settings = load_settings(**overrides)
    setup_logging("client", settings.telemetry)
    provider = setup_tracing("client", settings.telemetry)
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    try:
        result = asyncio.run(_submit(settings, prompt, sampling, session, timeout_s))
    except TimeoutError:
        typer.echo(f"no result within {timeout_s:g}s", err=True)
        raise typer.Exit(1) from None
    finally:
        provider.shutdown()  # export the `send` span before printing
    typer.echo(result.model_dump_json(indent=2))


async def _submit(
    settings: Settings, prompt: str, sampling: SamplingParams, session: str | None, timeout_s: float
) -> InferenceResult:
    async with LodestarClient(settings) as client:
        return await client.generate(prompt=prompt, sampling=sampling, session_id=session, timeout_s=timeout_s)
