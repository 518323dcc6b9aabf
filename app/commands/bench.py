"""`lodestar bench sim`: compare routing policies in the discrete-event simulator."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
import yaml
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

if TYPE_CHECKING:
    from sim.policy_factory import PolicySpec

app = typer.Typer(no_args_is_help=True, help="Routing benchmarks.")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _policy_params(text: str | None) -> dict[str, dict[str, Any]]:
    """`--policy-params`: YAML or JSON text, or the path of a YAML file, mapping label -> parameters."""
    if text is None:
        return {}
    path = Path(text)
    try:
        data = yaml.safe_load(path.read_text() if path.is_file() else text)
    except yaml.YAMLError as err:
        raise typer.BadParameter(f"not YAML or JSON: {err}", param_hint="--policy-params") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise typer.BadParameter("expected a mapping of policy label to a mapping of parameters, e.g. "
                                 '\'{"learned": {"fallback": "lmetric"}}\'', param_hint="--policy-params")
    return {str(k): v for k, v in data.items()}


def policy_specs(policies: str, policy_params: str | None, baseline: str | None) -> list[PolicySpec]:
    """The runs' PolicySpecs from the options, every one checked before anything runs."""
    from sim.policy_factory import PolicySpec, check_spec

    try:
        specs = [PolicySpec.parse(p) for p in _split(policies)]
        if baseline is not None and baseline not in {s.label for s in specs}:
            specs.append(PolicySpec.parse(baseline))
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--policies") from None
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise typer.BadParameter(f"labels must be unique: {labels}", param_hint="--policies")
    params = _policy_params(policy_params)
    stray = sorted(set(params) - set(labels))
    if stray:
        raise typer.BadParameter(f"parameters for {stray}, which are not among the policies {labels}",
                                 param_hint="--policy-params")
    specs = [replace(s, params=params.get(s.label, {})) for s in specs]
    for s in specs:
        try:
            check_spec(s)
        except (KeyError, ValueError) as err:
            raise typer.BadParameter(str(err), param_hint="--policies/--policy-params") from None
    return specs


@app.command("sim")
def sim(
    cluster: Path = typer.Option(..., exists=True, dir_okay=False, help="Cluster YAML (configs/clusters/)."),
    workload: Path = typer.Option(..., exists=True, dir_okay=False, help="Workload YAML (configs/workloads/)."),
    policies: str = typer.Option(
        "round_robin,least_request,sglang_cache_aware,gpu_speed_queue",
        help="Comma-separated policies, each `name` or `label=name` (one policy twice, with other parameters, "
             "needs two labels). `lodestar bench policies` lists them."),
    policy_params: str | None = typer.Option(
        None, help="Parameters by policy label, as YAML or JSON text or a YAML file, e.g. "
                   '\'{"learned": {"fallback": "lmetric"}}\'; over those of settings (dispatcher.policy_params). '
                   "docs/policies.md lists every policy's parameters."),
    seeds: str = typer.Option("1", help="Comma-separated seeds; each seeds the workload stream and the engines."),
    duration: float | None = typer.Option(None, help="Cut arrivals at this many virtual seconds."),
    rate: float | None = typer.Option(None, help="Override the workload's arrival rate (req/s; sessions/s for "
                                                 "multi-turn)."),
    baseline: str | None = typer.Option(None, help="Policy label to compare against (default: best heuristic by "
                                                   "mean TTFT)."),
    refresh_interval: float = typer.Option(0.1, help="Seconds between the router's load snapshots."),
    out: Path = typer.Option(Path(".run/bench"), help="Output directory for results.json, results.md and plots."),
) -> None:
    """Run every policy x seed on identical arrivals; print a bench_serving-style table; write results."""
    from dispatcher.policies.registry import heuristic_names
    from sim.bench import run_benchmark
    from sim.cluster import read_cluster
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
    specs = policy_specs(policies, policy_params, baseline)
    seed_list = [int(s) for s in _split(seeds)]
    spec = read_cluster(cluster)
    try:
        work = load_workload(workload).with_duration(duration).with_rate(rate)
    except TraceNotFound as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    horizon = work.duration_s

    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[clock]}"),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        def on_run(label: str, seed: int):
            task = bar.add_task(f"{label} seed={seed}", total=horizon, clock="")

            def progress(now: float) -> None:
                bar.update(task, completed=min(now, horizon) if horizon else None, clock=f"t={now:,.0f}s")

            return progress

        outcomes = run_benchmark(spec, work, specs, seed_list, refresh_interval_s=refresh_interval, on_run=on_run)

    rows = [o.row for o in outcomes]
    means = mean_by_policy(rows)
    heuristics = [s.label for s in specs if s.policy in heuristic_names()]
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


@app.command("policies")
def policies_list() -> None:
    """List every policy `bench sim --policies` accepts, with what it does (docs/policies.md has their parameters)."""
    from rich.table import Table

    from sim.policy_factory import available_policies, describe_policy

    table = Table("policy", "what it does", box=None, highlight=False)
    for name in available_policies():
        table.add_row(name, describe_policy(name))
    Console().print(table)


@app.callback()
def _main() -> None:
    """Benchmarks."""
