"""`lodestar up`: the whole pipeline on this machine, a heuristic phase then a learned phase (app.demo)."""

from __future__ import annotations

from pathlib import Path

import typer

from lodestar.settings import PROJECT_ROOT

DEFAULT_CLUSTER = PROJECT_ROOT / "configs" / "clusters" / "demo.yaml"
DEFAULT_WORKLOAD = PROJECT_ROOT / "configs" / "workloads" / "demo.yaml"
DEFAULT_LOG_DIR = PROJECT_ROOT / ".run" / "up"


def up(
    cluster: Path = typer.Option(DEFAULT_CLUSTER, metavar="FILE",
                                 help="Cluster YAML (configs/clusters/): one emulator and worker per engine."),
    workload: Path = typer.Option(DEFAULT_WORKLOAD, metavar="FILE", help="Workload YAML (configs/workloads/)."),
    phase_seconds: float = typer.Option(60.0, min=1.0, help="Seconds of arrivals in each phase."),
    rate: float | None = typer.Option(None, min=0.01, help="Arrival rate, requests/s (sessions/s for multi-turn); "
                                                           "default: the workload file's."),
    time_scale: float = typer.Option(2.0, min=0.01, help="Emulator time scale: wall seconds per emulated GPU "
                                                          "second (2: engines run at half speed, CPU to spare)."),
    heuristic: str = typer.Option("sglang_cache_aware", help="Policy of phase 1 (any registered heuristic)."),
    seed: int = typer.Option(1, help="Seed of phase 1's request stream (phase 2 uses seed + 1)."),
    startup_timeout: float = typer.Option(180.0, min=1.0, help="Seconds to wait for each tier of the stack."),
    request_timeout: float = typer.Option(120.0, min=1.0, help="Seconds a request may wait for its result."),
    log_dir: Path = typer.Option(DEFAULT_LOG_DIR, help="Where each process writes its log."),
    gateway: bool = typer.Option(False, help="Send the traffic through a gateway (lodestar gateway) as streamed "
                                             "OpenAI completions instead of through the client library."),
) -> None:
    """Run the whole pipeline here (Kafka, Redis, emulators, workers, learner, two dispatchers) and compare a
    heuristic phase with a learned phase; exit 1 unless every request got exactly one result."""
    from app.demo import run_demo

    raise typer.Exit(run_demo(
        cluster, workload, phase_seconds=phase_seconds, rate=rate, time_scale=time_scale, heuristic=heuristic,
        seed=seed, startup_timeout=startup_timeout, request_timeout=request_timeout, log_dir=log_dir,
        gateway=gateway,
    ))
