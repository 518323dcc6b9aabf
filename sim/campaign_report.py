"""The results campaign's write-up: summary and criteria tables, per-scenario sections, learning-curve plots,
and the generated regions of docs/results.md (the hand-written text around them is kept).

Tables and plots reuse sim/report.py (per-policy means, the bench's markdown table, figure saving); the
numbers come from sim/campaign/ (ScenarioReport, the criteria's verdicts).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from sim.campaign.aggregate import ScenarioReport, pooled, seed_runs
from sim.campaign.criteria import Verdict, pct, seconds, x
from sim.campaign.matrix import Campaign, Scenario
from sim.campaign.runs import FALLBACK, RunData, RunKey
from sim.campaign.stats import WINDOW_S, Settling, per_seed_ratios, window_means
from sim.policy_factory import PolicySpec
from sim.report import markdown_table, mean_by_policy, pyplot, save_figure

COMMAND = ".venv/bin/python scripts/results_campaign.py"


def bench_command(scenario: Scenario, specs: Sequence[PolicySpec], seeds: Sequence[int], out_name: str) -> str:
    """The `lodestar bench sim` command that reproduces these runs."""
    policies = ",".join(s.label if s.label == s.policy else f"{s.label}={s.policy}" for s in specs)
    params = {s.label: dict(s.params) for s in specs if s.params}
    params_arg = f" \\\n    --policy-params '{json.dumps(params)}'" if params else ""
    return (f".venv/bin/lodestar bench sim --cluster configs/clusters/{scenario.cluster}.yaml \\\n"
            f"    --workload configs/workloads/{scenario.workload}.yaml --rate {scenario.rate:g} "
            f"--duration {scenario.duration_s:g} --seeds {','.join(map(str, seeds))} \\\n"
            f"    --policies {policies}{params_arg} --out .run/bench/{out_name}")


def _settle(s: Settling | None) -> str:
    if s is None:
        return "-"
    return "never" if s.settle_s is None else f"{s.settle_s:.0f} s"


def _steady(s: Settling | None) -> str:
    return "-" if s is None else f"{s.steady:.1f} ms"


def _steady_x(s: Settling | None) -> str:
    return "-" if s is None else x(s.steady)


def _share(value: float | None) -> str:
    return "none" if value is None else pct(value)


def anchor(scenario: Scenario) -> str:
    """The GitHub heading anchor of a scenario's detail heading."""
    text = scenario.title.lower()
    return "".join(ch for ch in text.replace(" ", "-") if ch.isalnum() or ch in "-_")


def tail_cell(r: ScenarioReport) -> str:
    """Learned's P99 x against the best-tail baseline, where that is not the best baseline."""
    c = r.learned
    return "same" if c.tail_baseline == c.baseline else f"{c.tail_baseline}: {x(c.tail_p99_x)} ({x(c.tail_p99_x_min)})"


def oracle_cells(r: ScenarioReport) -> tuple[str, str]:
    """The oracle's x (mean / P99) and the share of its headroom learned takes (mean / P99)."""
    h = r.headroom
    if h is None:
        return "-", "-"
    return f"{x(h.oracle_x_mean)} / {x(h.oracle_x_p99)}", f"{_share(h.share_mean)} / {_share(h.share_p99)}"


def shift_cell(r: ScenarioReport) -> str:
    """The settle time after the shift, on a shift scenario."""
    if r.scenario.shift_at_s is None:
        return "-"
    return "not measured" if r.x_settling is None else _settle(r.x_settling)


def summary_markdown(reports: Sequence[ScenarioReport], campaign: Campaign, verdicts: Sequence[Verdict],
                     source: Mapping[str, str], wall_s: float, invocations: int, default_family: str) -> str:
    """The learned section's top: how the numbers were made, the two summary tables and the criteria."""
    c = campaign.criteria
    oracle_seeds = sorted({s for r in reports if r.headroom is not None for s in r.headroom.seeds})
    lines = [
        f"Numbers from commit `{source['commit'][:10]}`"
        + (f" with uncommitted changes in {source['dirty_files']}" if source["dirty_files"] else "")
        + f"; `learned` is the `{default_family}` family (settings `learner.model`). "
        f"Simulating the {len(reports)} scenarios took {wall_s / 60:.1f} min of wall time on the shared "
        f"2-core machine, 2 processes, over {invocations} invocation(s) of `{COMMAND}` (runs are cached under "
        ".run/campaign, each while what it is and the code it runs are unchanged).",
        "",
        "x = best baseline's TTFT / learned's TTFT, per seed, then mean over seeds (min over seeds in "
        "brackets); the best baseline is the scenario's baseline with the least mean TTFT over seeds (of the "
        f"{len(campaign.baselines)}: {', '.join(campaign.baselines)}; of fewer where a scenario's command "
        "lists fewer). Best tail = the baseline with the least P99 TTFT over seeds where that is another one, "
        "and learned's P99 x against it. Oracle x = best baseline / oracle in mean TTFT, best-tail baseline / "
        f"oracle in P99, on the seeds the oracle ran ({', '.join(map(str, oracle_seeds)) or '-'}); headroom "
        "taken = (best - learned) / (best - oracle) on those seeds, in mean and in P99 (1 = as good as the "
        f"oracle, 0 = as the best baseline; none where the oracle is less than {x(c.no_headroom_below)} "
        f"better). First {c.cold_start_s:g} s x = the same ratio over the requests arriving in the first "
        f"{c.cold_start_s:g} s, from cold start. Settle = time from cold start (or from the shift) until the "
        f"{WINDOW_S:.0f} s-window x curve (seeds pooled) stays within {pct(c.settle_tolerance)} of its steady "
        "value (over the last third of the run; - where that is shorter than 240 s).",
        "",
        f"| scenario | kind | best baseline | x mean | x P99 | best tail: x P99 | oracle x mean / P99 | headroom "
        f"taken mean / P99 | first {c.cold_start_s:g} s x | settle after shift |",
        "|---|---|---|---:|---:|---|---:|---:|---:|---|",
    ]
    for r in reports:
        k = r.learned
        oracle_x, taken = oracle_cells(r)
        lines.append(
            f"| [{r.scenario.title}](#{anchor(r.scenario)}) | {'homo' if r.homogeneous else 'hetero'} | "
            f"{k.baseline} | {x(k.mean_x)} ({x(k.mean_x_min)}) | {x(k.p99_x)} ({x(k.p99_x_min)}) | {tail_cell(r)} | "
            f"{oracle_x} | {taken} | {x(r.first_x)} | {shift_cell(r)} |")
    lines += [
        "",
        "Learning: warm x = x over the requests that arrived after the learner's first validated snapshot "
        "(per seed), i.e. without the cold-start fallback; oracle gap = learned mean TTFT / oracle mean TTFT "
        "(first oracle seed); settle abs = the settle rule on learned's own mean TTFT curve, with the best "
        "baseline's figure under that rule in brackets (a baseline does not learn, so its figure is what the "
        "traffic's own changes do to the rule); model share = learned decisions made by the model rather than "
        "the cold-start / out-of-range fallback.",
        "",
        "| scenario | warm x | oracle gap | settle x | settle abs (baseline) | model share | requests |",
        "|---|---:|---:|---|---|---:|---:|",
    ]
    for r in reports:
        gap = "-" if r.learned.oracle_gap is None else f"{r.learned.oracle_gap:.2f}"
        lines.append(f"| {r.scenario.title} | {x(r.warm_x)} | {gap} | {_settle(r.x_settling)} | "
                     f"{_settle(r.settling)} ({_settle(r.baseline_settling)}) | {r.model_share:.0%} | "
                     f"{r.requests:,} |")
    lines += ["", *verdicts_markdown(verdicts)]
    return "\n".join(lines) + "\n"


def verdicts_markdown(verdicts: Sequence[Verdict]) -> list[str]:
    """The criteria table: one line per criterion, passed or failed, with the worst case and every miss."""
    lines = ["| criterion (issue 11, on seed means) | result | met | worst | missed (value) |",
             "|---|---|---|---|---|"]
    for v in verdicts:
        result = "n/a" if v.passed is None else "PASS" if v.passed else "FAIL"
        lines.append(f"| {v.criterion} | {result} | {v.met} | {v.worst} | {'; '.join(v.misses) or '-'} |")
    lines += ["", "The dispatcher's per-request CPU cost, the last criterion, is measured by "
              "`scripts/bench_dispatcher.py`, not by the campaign."]
    return lines


def first_validated(r: ScenarioReport) -> str:
    """When the learner's first validated snapshot came out, per seed."""
    return ", ".join("never" if math.isnan(t) else f"{t:.0f} s" for t in r.first_validated_s) or "-"


def scenario_markdown(r: ScenarioReport, campaign: Campaign) -> str:
    """A scenario's commands, its per-policy table and the learned-vs-best-baseline line."""
    specs = campaign.specs
    sc = r.scenario
    seeds = list(sc.seeds)
    cmds = [bench_command(sc, [specs[p] for p in sc.policies], seeds, sc.slug)]
    if sc.oracle:
        cmds.append(bench_command(sc, [specs[sc.learned], specs[sc.oracle]], seeds[:1], sc.slug + "-oracle"))
    c = r.learned
    out = [f"#### {sc.title}", "", "```bash", *cmds, "```", ""]
    shift = f"; shift at t = {sc.shift_at_s:g} s" if sc.shift_at_s is not None else ""
    out.append(f"{r.requests:,} requests per seed over {r.span_s:.0f} s of arrivals{shift}. Mean over seeds "
               f"{','.join(map(str, seeds))} (oracle: seed {seeds[0]} only); latencies in ms; "
               f"x = {c.baseline} (best baseline) / policy.")
    out += ["", "| policy | TTFT mean | P50 | P90 | P99 | E2E mean | hit rate | load share | x mean | x P99 |",
            "|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    means = mean_by_policy(r.rows)
    for policy in [*sc.policies, *([sc.oracle] if sc.oracle else [])]:
        if policy not in means:
            continue
        m = means[policy]
        share = m["load_share"]
        xm = per_seed_ratios(r.rows, policy, c.baseline, "ttft_mean_ms")
        xp = per_seed_ratios(r.rows, policy, c.baseline, "ttft_p99_ms")
        name = f"**{policy}**" if policy == c.baseline else policy
        out.append(f"| {name} | {m['ttft_mean_ms']:,.1f} | {m['ttft_p50_ms']:,.1f} | {m['ttft_p90_ms']:,.1f} | "
                   f"{m['ttft_p99_ms']:,.0f} | {m['e2e_mean_ms']:,.0f} | {m['prefix_hit_rate']:.3f} | "
                   f"{' '.join(f'{g} {s:.0%}' for g, s in share.items()) if len(share) > 1 else '-'} | "
                   f"{x(float(np.mean(xm)))} | {x(float(np.mean(xp)))} |")
    gap = "" if c.oracle_gap is None else f"; oracle gap {c.oracle_gap:.2f}"
    tail = "" if c.tail_baseline == c.baseline else (
        f"; P99 against the best-tail baseline {c.tail_baseline} {x(c.tail_p99_x)} (min {x(c.tail_p99_x_min)})")
    room = ""
    if r.headroom is not None:
        oracle_x, taken = oracle_cells(r)
        room = f"; oracle x {oracle_x} (mean / P99), headroom taken {taken}"
    first = f"first {campaign.criteria.cold_start_s:g} s x {x(r.first_x)}"
    out += ["", f"Learned vs {c.baseline}: mean {x(c.mean_x)} (min over seeds {x(c.mean_x_min)}), "
                f"P99 {x(c.p99_x)} (min {x(c.p99_x_min)}){tail}{gap}{room}; {first}; mean after the first validated "
                f"snapshot (at t = {first_validated(r)}) {x(r.warm_x)}; the model made {r.model_share:.0%} of the "
                f"learned decisions; settle x {_settle(r.x_settling)}, abs {_settle(r.settling)} (best baseline's "
                f"own: {_settle(r.baseline_settling)}).", ""]
    return "\n".join(out)


def families_markdown(reports: Sequence[ScenarioReport], learned: str, default_family: str) -> str:
    """The model families side by side where they ran."""
    families = list(dict.fromkeys(f for r in reports for f in r.families))
    lines = [f"| scenario | best baseline | {learned} ({default_family}) x mean | x P99 | oracle gap | "
             + "".join(f"{f} x mean | x P99 | " for f in families),
             "|---|---|---:|---:|---:|" + "---:|---:|" * len(families)]
    for r in reports:
        if not r.families:
            continue
        k = r.learned
        gap = "-" if k.oracle_gap is None else f"{k.oracle_gap:.2f}"
        cells = "".join(f"{x(r.families[f].mean_x)} ({x(r.families[f].mean_x_min)}) | {x(r.families[f].p99_x)} | "
                        if f in r.families else "- | - | " for f in families)
        lines.append(f"| {r.scenario.title} | {k.baseline} | {x(k.mean_x)} ({x(k.mean_x_min)}) | {x(k.p99_x)} | "
                     f"{gap} | {cells}".rstrip())
    return "\n".join(lines) + "\n"


def plot_curve(runs: Mapping[RunKey, RunData], r: ScenarioReport, path: Path, tolerance: float) -> None:
    """Three panels over arrival time, seeds pooled, per window: mean TTFT of learned, the best baseline
    (and the oracle, seed 1); the x curve (best baseline / learned) with its steady band and settle time;
    the share of learned decisions the model made (not the fallback)."""
    plt = pyplot()
    sc = r.scenario
    end = min(sc.duration_s, r.span_s)
    fig, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 7), sharex=True, height_ratios=(3, 2, 1))
    means: dict[str, np.ndarray] = {}
    for policy, style in ((sc.learned, "-"), (r.learned.baseline, "--"), (sc.oracle, ":")):
        if policy is None or not seed_runs(runs, sc, policy):
            continue
        arrival, ttft = pooled(runs, sc, policy)
        starts, means[policy] = window_means(arrival, ttft, 0.0, end, WINDOW_S)
        label = f"{policy} (seed {sc.seeds[0]})" if policy == sc.oracle else policy
        top.plot(starts + WINDOW_S / 2, means[policy], style, marker="o", markersize=3, label=label)
    top.set_ylabel(f"mean TTFT per {WINDOW_S:.0f} s (ms)")
    top.set_title(f"{sc.title}, seeds {','.join(map(str, sc.seeds))} pooled", fontsize=10)
    middle.plot(starts + WINDOW_S / 2, means[r.learned.baseline] / means[sc.learned], marker="o", markersize=3,
                color="black", label=f"x = {r.learned.baseline} / {sc.learned}")
    middle.axhline(1.0, color="grey", lw=0.8, ls=":")
    middle.set_ylabel("x per window")
    if r.x_settling is not None:
        steady = r.x_settling.steady
        middle.axhspan(steady * (1 - tolerance), steady * (1 + tolerance), color="grey", alpha=0.2,
                       label=f"steady x {steady:.2f} ±{tolerance:.0%}")
        if r.x_settling.settle_s is not None:
            at = (sc.shift_at_s or 0.0) + r.x_settling.settle_s
            for ax in (top, middle):
                ax.axvline(at, color="green", lw=1)
            middle.plot([], [], color="green", lw=1, label=f"settled: {r.x_settling.settle_s:.0f} s")
    if sc.shift_at_s is not None:
        for ax in (top, middle, bottom):
            ax.axvline(sc.shift_at_s, color="red", lw=1)
        top.plot([], [], color="red", lw=1, label=f"shift at {sc.shift_at_s:g} s")
    mine = seed_runs(runs, sc, sc.learned)
    arrival = np.concatenate([d.arrival_s for d in mine])
    kind = np.concatenate([d.kind for d in mine])
    _, share = window_means(arrival, (kind != FALLBACK).astype(np.float64), 0.0, end, WINDOW_S)
    bottom.plot(starts + WINDOW_S / 2, share, marker="o", markersize=3)
    bottom.set_ylim(-0.05, 1.05)
    bottom.set_ylabel("model share")
    bottom.set_xlabel("arrival time (s, virtual)")
    for ax in (top, middle, bottom):
        ax.grid(True, alpha=0.3)
    for ax in (top, middle):
        ax.legend(fontsize="small")
    save_figure(fig, path, dpi=90)


def plot_path(img: Path, scenario: Scenario) -> Path | None:
    """Where a scenario's curve is drawn, if it has one: a learning curve or an adaptation after a shift."""
    if scenario.shift_at_s is not None:
        return img / f"shift_{scenario.cluster}_{scenario.workload}.png"
    if scenario.curve:
        return img / f"learning_{scenario.cluster}_{scenario.workload}.png"
    return None


def details_markdown(reports: Sequence[ScenarioReport], plots: Mapping[str, Path], doc: Path,
                     campaign: Campaign, default_family: str) -> str:
    """Families, curves, shifts and the per-scenario sections."""
    def rel(p: Path) -> str:
        return os.path.relpath(p, doc.parent)

    learned = reports[0].scenario.learned if reports else "learned"
    families = sorted({f for r in reports for f in r.families})
    out = ["### Model families", "",
           f"`{learned}` ({default_family}) beside {', '.join(f'`{f}`' for f in families) or 'no other family'} "
           "on the same arrivals:", "", families_markdown(reports, learned, default_family)]
    curves = [r for r in reports if r.scenario.curve and r.scenario.shift_at_s is None and r.scenario.slug in plots]
    shifts = [r for r in reports if r.scenario.shift_at_s is not None and r.scenario.slug in plots]
    if curves:
        out += ["### Learning from cold start", ""]
        for r in curves:
            out += [f"**{r.scenario.title}**: the x curve settles in {_settle(r.x_settling)} (steady x "
                    f"{_steady_x(r.x_settling)}); learned's own TTFT curve in {_settle(r.settling)} (steady "
                    f"{_steady(r.settling)}; the best baseline's own curve under that rule: "
                    f"{_settle(r.baseline_settling)}); first {campaign.criteria.cold_start_s:g} s x {x(r.first_x)}; "
                    f"first validated snapshot at t = {first_validated(r)} (per seed).", "",
                    f"![learning curve]({rel(plots[r.scenario.slug])})", ""]
    if shifts:
        out += ["### Adaptation after a shift", ""]
        for r in shifts:
            out += [f"**{r.scenario.title}** (shift at t = {r.scenario.shift_at_s:g} s): the x curve "
                    f"settles {_settle(r.x_settling)} after the shift (steady x {_steady_x(r.x_settling)}; "
                    f"criterion: {seconds(campaign.criteria.settle_s)}); learned's own TTFT curve "
                    f"{_settle(r.settling)} (new steady state {_steady(r.settling)}; best baseline's own: "
                    f"{_settle(r.baseline_settling)}).", "", f"![adaptation]({rel(plots[r.scenario.slug])})", ""]
    out += ["### Per scenario", ""]
    out += [scenario_markdown(r, campaign) for r in reports]
    return "\n".join(out)


def replace_region(text: str, name: str, body: str) -> str:
    """Replace the generated region `name` in `text` (markers kept)."""
    begin, end = f"<!-- generated:{name}:begin -->", f"<!-- generated:{name}:end -->"
    i, j = text.find(begin), text.find(end)
    if i < 0 or j < i:
        raise ValueError(f"docs/results.md lacks the markers of region {name!r}")
    return text[:i + len(begin)] + "\n" + body.rstrip() + "\n" + text[j:]


LEARNED_SECTION_SKELETON = """## Learned routing

<!-- generated:summary:begin -->
<!-- generated:summary:end -->

<!-- generated:details:begin -->
<!-- generated:details:end -->

"""


def write_doc(doc: Path, summary: str, details: str) -> None:
    """Fill the generated regions of the learned section (added before the baselines if it is missing)."""
    text = doc.read_text()
    if "<!-- generated:summary:begin -->" not in text:
        at = text.index("## Baselines")
        text = text[:at] + LEARNED_SECTION_SKELETON + text[at:]
    doc.write_text(replace_region(replace_region(text, "summary", summary), "details", details))


def write_scenario_files(out: Path, r: ScenarioReport) -> None:
    """results.json (every run's row, as `lodestar bench sim` writes it) and results.md per scenario."""
    folder = out / r.scenario.slug
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(r.rows, indent=2))
    (folder / "results.md").write_text(f"{r.scenario.title}\n\n"
                                       f"{markdown_table(mean_by_policy(r.rows), r.learned.baseline)}")
