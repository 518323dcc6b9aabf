"""The measured evidence for learned routing: one command runs the whole simulator campaign and writes it up.

    .venv/bin/python scripts/results_campaign.py [--config configs/campaign.yaml] [--jobs 2]
        [--out .run/campaign] [--quick] [--no-doc]

Runs the scenario matrix of the campaign file (configs/campaign.yaml: every baseline and the `learned`
policy under seeds 1-3, the greedy oracle on seed 1 where affordable, the other model families beside
`learned` on a few scenarios, two shift scenarios), each run exactly as `lodestar bench sim` runs it, in
`--jobs` processes, cached under `<out>/<scenario>/runs/` so an interrupted or extended campaign resumes
(sim/campaign/runs.py says when a run is reused). Per scenario it writes `<out>/<scenario>/results.json`
and `results.md` in the bench's format; then the learned-routing sections of docs/results.md (between
generated-region markers; hand-written text around them is kept) and the plots in docs/img/. `--quick`
runs the file's smoke matrix (two short scenarios, one seed) under `<out>-quick` and leaves the docs alone.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from lodestar.settings import PROJECT_ROOT, Settings
from sim.campaign.aggregate import scenario_report
from sim.campaign.criteria import evaluate
from sim.campaign.matrix import CONFIG, CampaignError, load_campaign
from sim.campaign.runs import campaign_wall_s, run_campaign, source_id
from sim.campaign_report import (
    details_markdown,
    plot_curve,
    plot_path,
    summary_markdown,
    write_doc,
    write_scenario_files,
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=CONFIG, help="the campaign file")
    parser.add_argument("--jobs", type=int, default=2, help="simulations run in parallel")
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / ".run" / "campaign")
    parser.add_argument("--doc", type=Path, default=PROJECT_ROOT / "docs" / "results.md")
    parser.add_argument("--img", type=Path, default=PROJECT_ROOT / "docs" / "img")
    parser.add_argument("--quick", action="store_true", help="the smoke matrix; writes under <out>-quick, no docs")
    parser.add_argument("--no-doc", action="store_true", help="run and aggregate, but leave the docs alone")
    args = parser.parse_args()
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")

    try:
        campaign = load_campaign(args.config, quick=args.quick)
    except (OSError, CampaignError) as err:
        print(err, file=sys.stderr)
        return 2
    out = args.out.with_name(args.out.name + "-quick") if args.quick else args.out
    img = out / "img" if args.quick else args.img
    source = source_id()
    dirty = f" + uncommitted changes in {source['dirty_files']}" if source["dirty_files"] else ""
    print(f"source: {source['commit'][:10]}{dirty}", flush=True)
    t0 = time.perf_counter()
    runs, simulated = run_campaign(campaign.scenarios, campaign.specs, out, args.jobs, source)
    wall_s, invocations = campaign_wall_s(out, source, time.perf_counter() - t0, simulated)
    reports = [scenario_report(runs, sc, campaign.criteria) for sc in campaign.scenarios]
    plots = {}
    for r in reports:
        write_scenario_files(out, r)
        path = plot_path(img, r.scenario)
        if path is not None:
            plots[r.scenario.slug] = path
            plot_curve(runs, r, path, campaign.criteria.settle_tolerance)
    family = Settings().learner.model
    verdicts = evaluate([r.figures() for r in reports], campaign.criteria)
    summary = summary_markdown(reports, campaign, verdicts, source, wall_s, invocations, family)
    details = details_markdown(reports, plots, args.doc, campaign, family)
    (out / "learned_summary.md").write_text(summary)
    (out / "learned_details.md").write_text(details)
    print(summary)
    if not (args.quick or args.no_doc):
        write_doc(args.doc, summary, details)
        print(f"wrote {args.doc} and {len(plots)} plots in {img}")
    print(f"this invocation {time.perf_counter() - t0:.0f} s; campaign simulation wall time {wall_s:.0f} s "
          f"over {invocations} invocation(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
