"""Benchmark reporting: the side-by-side table (bench_serving's metrics, ratios to a baseline) and plots."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

# (results key, column header, lower is better)
TABLE_COLUMNS: tuple[tuple[str, str, bool], ...] = (
    ("ttft_mean_ms", "TTFT mean", True),
    ("ttft_p50_ms", "TTFT p50", True),
    ("ttft_p90_ms", "TTFT p90", True),
    ("ttft_p99_ms", "TTFT p99", True),
    ("tpot_mean_ms", "TPOT mean", True),
    ("itl_mean_ms", "ITL mean", True),
    ("e2e_mean_ms", "E2E mean", True),
    ("e2e_p99_ms", "E2E p99", True),
    ("request_throughput", "req/s", False),
    ("output_throughput", "out tok/s", False),
    ("prefix_hit_rate", "hit", False),
)


def mean_by_policy(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per policy (in first-seen order), the mean over seeds of every numeric field; load share averaged too."""
    grouped: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        grouped[row["policy"]].append(row)
    out: dict[str, dict[str, Any]] = {}
    for policy, runs in grouped.items():
        agg: dict[str, Any] = {"policy": policy, "seeds": len(runs)}
        for key, value in runs[0].items():
            if isinstance(value, int | float) and not isinstance(value, bool) and key != "seed":
                agg[key] = float(np.mean([r[key] for r in runs]))
        shares: dict[str, float] = defaultdict(float)
        for r in runs:
            for gpu, s in r.get("load_share", {}).items():
                shares[gpu] += s / len(runs)
        agg["load_share"] = dict(shares)
        out[policy] = agg
    return out


def pick_baseline(means: Mapping[str, Mapping[str, Any]], candidates: Sequence[str],
                  key: str = "ttft_mean_ms") -> str | None:
    """The candidate with the least `key` (by default mean TTFT: the best heuristic), or None if there is none;
    ties go to the first listed."""
    present = [p for p in candidates if p in means]
    return min(present, key=lambda p: means[p][key]) if present else None


def _ratio(base: float, value: float, lower_is_better: bool) -> float:
    if lower_is_better:
        return base / value if value > 0 else float("inf")
    return value / base if base > 0 else float("inf")


def results_table(means: Mapping[str, Mapping[str, Any]], baseline: str | None, title: str) -> Table:
    """One row per policy: bench_serving's metrics (mean over seeds), then ratios to `baseline`.

    Ratios read "times better than the baseline": baseline / policy for latencies, policy / baseline
    for throughput, so 1.5x means 1.5 times lower latency.
    """
    caption = "latencies in ms, mean over seeds"
    if baseline:
        caption += f"; x = {baseline} / policy (>1 is better)"
    table = Table(title=title, caption=caption)
    table.add_column("Policy", style="bold")
    for _, header, _ in TABLE_COLUMNS:
        table.add_column(header, justify="right")
    table.add_column("load share", justify="left")
    if baseline:
        table.add_column("x TTFT mean", justify="right")
        table.add_column("x TTFT p99", justify="right")
    base = means.get(baseline) if baseline else None
    for policy, m in means.items():
        cells = [policy + (" *" if policy == baseline else "")]
        for key, _, _ in TABLE_COLUMNS:
            value = m.get(key, float("nan"))
            cells.append(f"{value:.3f}" if key == "prefix_hit_rate" else f"{value:,.1f}")
        cells.append(" ".join(f"{g} {s:.0%}" for g, s in m.get("load_share", {}).items()))
        if base is not None:
            cells.append(f"{_ratio(base['ttft_mean_ms'], m['ttft_mean_ms'], True):.2f}x")
            cells.append(f"{_ratio(base['ttft_p99_ms'], m['ttft_p99_ms'], True):.2f}x")
        table.add_row(*cells)
    return table


def markdown_table(means: Mapping[str, Mapping[str, Any]], baseline: str | None) -> str:
    """The same table as `results_table`, as GitHub markdown (for docs/results.md)."""
    headers = ["policy", *(h for _, h, _ in TABLE_COLUMNS), "load share"]
    if baseline:
        headers += [f"x TTFT mean vs {baseline}", "x TTFT p99"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    base = means.get(baseline) if baseline else None
    for policy, m in means.items():
        cells = [f"**{policy}**" if policy == baseline else policy]
        for key, _, _ in TABLE_COLUMNS:
            value = m.get(key, float("nan"))
            cells.append(f"{value:.3f}" if key == "prefix_hit_rate" else f"{value:,.1f}")
        cells.append(" ".join(f"{g} {s:.0%}" for g, s in m.get("load_share", {}).items()))
        if base is not None:
            cells.append(f"{_ratio(base['ttft_mean_ms'], m['ttft_mean_ms'], True):.2f}x")
            cells.append(f"{_ratio(base['ttft_p99_ms'], m['ttft_p99_ms'], True):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def print_results(console: Console, means: Mapping[str, Mapping[str, Any]], baseline: str | None,
                  title: str) -> None:
    """Print the side-by-side table."""
    console.print(results_table(means, baseline, title))


def plot_ttft_cdf(ttft_s: Mapping[str, Sequence[np.ndarray]], path: Path, title: str) -> None:
    """One TTFT CDF per policy (all its seeds pooled), log-scaled time axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for policy, runs in ttft_s.items():
        values = np.sort(np.concatenate(runs)) * 1000.0 if runs else np.zeros(0)
        if len(values) == 0:
            continue
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=policy)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    _save(fig, ax, path, title)


def plot_ttft_over_time(series: Mapping[str, Sequence[tuple[np.ndarray, np.ndarray]]], path: Path, title: str,
                        bins: int = 60) -> None:
    """Mean TTFT per arrival-time bin for each policy (seeds pooled): learning and shifts show here."""
    plt = pyplot()
    end = max((float(a.max()) for runs in series.values() for a, _ in runs if len(a)), default=0.0)
    edges = np.linspace(0.0, end if end > 0 else 1.0, bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    fig, ax = plt.subplots(figsize=(9, 5))
    for policy, runs in series.items():
        if not runs:
            continue
        arrival = np.concatenate([a for a, _ in runs])
        ttft = np.concatenate([t for _, t in runs]) * 1000.0
        which = np.clip(np.digitize(arrival, edges) - 1, 0, bins - 1)
        total = np.bincount(which, weights=ttft, minlength=bins)
        count = np.bincount(which, minlength=bins)
        with np.errstate(invalid="ignore", divide="ignore"):
            ax.plot(centers, np.where(count > 0, total / count, np.nan), label=policy)
    ax.set_yscale("log")
    ax.set_xlabel("arrival time (s, virtual)")
    ax.set_ylabel("mean TTFT (ms)")
    _save(fig, ax, path, title)


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (imported on first use: only plotting needs it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 120) -> None:
    """Lay the figure out, write it as a PNG (creating its folder) and free it."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def _save(fig: Any, ax: Any, path: Path, title: str) -> None:
    """Title, grid and legend as every plot here has them; write the PNG and free the figure."""
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)
