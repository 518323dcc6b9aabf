"""Rich renderings of phase tallies: the live progress panel and the final comparison tables."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence

from rich.console import Group
from rich.table import Table
from rich.text import Text

from app.traffic import PhaseTally, TTFTSummary
from lodestar.snapshot import Snapshot


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _top(counts: Counter[str] | Counter[int], limit: int = 4, fmt: str = "{}") -> str:
    total = sum(counts.values())
    if not total:
        return "-"
    return ", ".join(f"{fmt.format(k)} {n / total:.0%}" for k, n in counts.most_common(limit))


def _versions(counts: Counter[int]) -> str:
    """Model versions used: each with its share when few, else the range."""
    if len(counts) <= 3:
        return _top(counts, fmt="v{}")
    return f"v{min(counts)}-v{max(counts)} ({len(counts)} versions)"


def describe_snapshot(snapshot: Snapshot | None) -> str:
    """One line about the learner's current snapshot."""
    if snapshot is None:
        return "no snapshot yet"
    holdout = snapshot.meta.get("holdout", {})
    skill = holdout.get("skill")
    return (f"v{snapshot.version} after {snapshot.meta.get('n_seen', '?')} events, "
            f"{'validated' if snapshot.validated else 'not validated'}"
            + ("" if skill is None else f" (held-out skill {skill:.2f})"))


def progress_lines(tally: PhaseTally, label: str, phase_s: float, snapshot: Snapshot | None) -> list[str]:
    """The live state of a phase as plain lines (also what a non-terminal output prints)."""
    elapsed = time.monotonic() - tally.started_at
    roll = tally.rolling_ttft()
    return [
        f"{label}: {min(elapsed, phase_s):.0f}/{phase_s:.0f} s"
        + ("" if elapsed <= phase_s else f" (+{elapsed - phase_s:.0f} s draining)"),
        f"sent {len(tally.sent)} · completed {tally.completed} · in flight {tally.in_flight} · errors {tally.errors}",
        f"rolling TTFT (last {roll.count}): p50 {_ms(roll.p50)} ms · p90 {_ms(roll.p90)} ms",
        f"decisions: {_top(tally.policy_counts())} · model {_versions(tally.model_versions())}",
        f"dispatchers: {_top(tally.dispatcher_counts())} · load: {_fmt_shares(tally.gpu_shares())}",
        f"learner: {describe_snapshot(snapshot)}",
    ]


def progress_panel(tally: PhaseTally, label: str, phase_s: float, snapshot: Snapshot | None) -> Group:
    """The live view of a running phase."""
    lines = progress_lines(tally, label, phase_s, snapshot)
    return Group(Text(lines[0], style="bold"), *(Text("  " + line) for line in lines[1:]))


def _fmt_shares(shares: dict[str, float]) -> str:
    return " · ".join(f"{gpu} {share:.0%}" for gpu, share in shares.items()) or "-"


def ttft_table(rows: Sequence[tuple[str, TTFTSummary]], title: str) -> Table:
    """One row per phase: count, errors, mean and percentiles of TTFT."""
    table = Table(title=title, title_justify="left")
    table.add_column("phase")
    for name in ("count", "errors", "mean", "p50", "p90", "p99"):
        table.add_column(name, justify="right")
    for name, s in rows:
        table.add_row(name, str(s.count), str(s.errors), _ms(s.mean), _ms(s.p50), _ms(s.p90), _ms(s.p99))
    return table


def load_share_table(tallies: Sequence[tuple[str, PhaseTally]], workers_by_gpu: dict[str, list[str]]) -> Table:
    """Share of each phase's answered requests per GPU type, and per worker."""
    table = Table(title="Load share (answered requests)", title_justify="left")
    table.add_column("GPU / worker")
    for name, _ in tallies:
        table.add_column(name, justify="right")
    shares = [t.gpu_shares() for _, t in tallies]
    counts = [t.worker_counts() for _, t in tallies]
    totals = [max(sum(c.values()), 1) for c in counts]
    for gpu, worker_ids in workers_by_gpu.items():
        table.add_row(Text(gpu, style="bold"), *(f"{s.get(gpu, 0.0):.1%}" for s in shares))
        for wid in worker_ids:
            table.add_row(f"  {wid}", *(f"{c.get(wid, 0) / t:.1%}" for c, t in zip(counts, totals, strict=True)))
    return table


def decisions_line(tally: PhaseTally) -> str:
    """Who decided a phase's requests and with which model versions."""
    return (f"{tally.name}: decisions {_top(tally.policy_counts(), limit=6)}; "
            f"model versions {_versions(tally.model_versions())}; "
            f"dispatchers {_top(tally.dispatcher_counts())}")
