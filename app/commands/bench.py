"""`lodestar bench sim`: compare routing policies in the discrete-event simulator."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

app = typer.Typer(no_args_is_help=True, help="Routing benchmarks.")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


@app.command("sim")
def sim(
    cluster: Path = typer.Option(..., exists=True, dir_okay=False, help="Cluster YAML (configs/clusters/)."),
    workload: Path = typer.Option(..., exists=True, dir_okay=False, help="Workload YAML (configs/workloads/)."),
    policies: str = typer.Option("round_robin,least_request,sglang_cache_aware,gpu_speed_queue",
                                 help="Comma-separated policy names."),
    seeds: str = typer.Option("1", help="Comma-separated seeds; each seeds the workload stream and the engines."),
    duration: float | None = typer.Option(None, help="Cut arrivals at this many virtual seconds."),
    rate: float | None = typer.Option(None, help="Override the workload's arrival rate (req/s; sessions/s for "
                                                 "multi-turn)."),
    baseline: str | None = typer.Option(None, help="Policy to compare against (default: best heuristic by "
                                                   "mean TTFT)."),
    refresh_interval: float = typer.Option(0.1, help="Seconds between the router's load snapshots."),
    out: Path = typer.Option(Path(".run/bench"), help="Output directory for results.json, results.md and plots."),
) -> None:
    """Run every policy x seed on identical arrivals; print a bench_serving-style table; write results."""
    from sim.bench import run_benchmark
    from sim.cluster import read_cluster
    from sim.policy_factory import available_policies, sim_only_names
    from sim.report import (
        markdown_table,
        mean_by_policy,
        pick_baseline,
        plot_ttft_cdf,
        plot_ttft_over_time,
        print_results,
    )
    from sim.workloads import TraceNotFound, load_workload

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # a wide table in files and pipes rather than a wrapped one
    names, seed_list = _split(policies), [int(s) for s in _split(seeds)]
    unknown = [p for p in names if p not in available_policies()]
    if unknown:
        raise typer.BadParameter(f"unknown policies {unknown}; known: {', '.join(available_policies())}")
    if baseline is not None and baseline not in names:
        names.append(baseline)
    spec = read_cluster(cluster)
    try:
        work = load_workload(workload).with_duration(duration).with_rate(rate)
    except TraceNotFound as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    horizon = work.duration_s

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[clock]}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        def on_run(policy: str, seed: int):
            task = bar.add_task(f"{policy} seed={seed}", total=horizon, clock="")

            def progress(now: float) -> None:
                bar.update(task, completed=min(now, horizon) if horizon else None, clock=f"t={now:,.0f}s")

            return progress

        outcomes = run_benchmark(spec, work, names, seed_list, refresh_interval_s=refresh_interval, on_run=on_run)

    rows = [o.row for o in outcomes]
    means = mean_by_policy(rows)
    heuristics = [p for p in names if p not in sim_only_names() and p != "learned"]
    chosen = baseline or pick_baseline(means, heuristics)
    rate_note = f" at {rate:g}/s" if rate is not None else ""
    title = f"{spec.name} / {work.name}{rate_note} (seeds {','.join(map(str, seed_list))})"
    print_results(console, means, chosen, title)
    for row in rows:
        console.print(f"[dim]{row['policy']} seed={row['seed']}: {row['completed']} completed, "
                      f"{row['failed']} failed, {row['sim_requests_per_wall_s']:,.0f} simulated req/s wall[/dim]")

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(f"{title}\n\n{markdown_table(means, chosen)}")
    by_policy_ttft: dict[str, list] = {}
    by_policy_series: dict[str, list] = {}
    for o in outcomes:
        by_policy_ttft.setdefault(o.row["policy"], []).append(o.ttft_s)
        by_policy_series.setdefault(o.row["policy"], []).append((o.arrival_s, o.ttft_s))
    plot_ttft_cdf(by_policy_ttft, out / "ttft_cdf.png", title)
    plot_ttft_over_time(by_policy_series, out / "ttft_over_time.png", title)
    console.print(f"wrote {out / 'results.json'}, results.md, ttft_cdf.png, ttft_over_time.png")


@app.callback()
def _main() -> None:
    """Benchmarks."""
