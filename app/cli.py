"""The `lodestar` command line: the composition root.

Each subcommand lives in `app/commands/` and imports the service it runs inside the command,
so the core never imports a service package at import time.
"""

from __future__ import annotations

import typer

from app.commands import bench, topics
from app.commands.dispatcher import dispatcher
from app.commands.emulator import emulator
from app.commands.learner import learner
from app.commands.submit import submit
from app.commands.up import up
from app.commands.worker import worker
from lodestar.settings import ConfigurationError

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Lodestar: a learned LLM request router.")
app.add_typer(topics.app, name="topics")
app.add_typer(bench.app, name="bench")
app.command("worker")(worker)
app.command("submit")(submit)
app.command("emulator")(emulator)
app.command("dispatcher")(dispatcher)
app.command("learner")(learner)
app.command("up")(up)


def main() -> None:
    """The `lodestar` command: settings that cannot be used end it with their reasons (exit 2), not a traceback."""
    try:
        app()
    except ConfigurationError as exc:
        typer.echo(f"lodestar: {exc}", err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
