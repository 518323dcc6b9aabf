"""The `lodestar` command line: the composition root.

Each subcommand lives in `lodestar/commands/` and imports the service it runs inside the command,
so the core never imports a service package at import time.
"""

from __future__ import annotations

import typer

from lodestar.commands import bench, topics
from lodestar.commands.dispatcher import dispatcher
from lodestar.commands.emulator import emulator
from lodestar.commands.learner import learner
from lodestar.commands.submit import submit
from lodestar.commands.up import up
from lodestar.commands.worker import worker

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Lodestar: a learned LLM request router.")
app.add_typer(topics.app, name="topics")
app.add_typer(bench.app, name="bench")
app.command("worker")(worker)
app.command("submit")(submit)
app.command("emulator")(emulator)
app.command("dispatcher")(dispatcher)
app.command("learner")(learner)
app.command("up")(up)


if __name__ == "__main__":
    app()
