"""The short form of the chaos run (scripts/chaos.py --short) as a test: the real stack (its own Redis, the
configured broker under its own topics and groups, three emulators, three workers, two dispatchers, the
learner) under open-loop load while a dispatcher, a worker and the learner are SIGKILLed, Redis is killed and
restarted empty, an engine answers 500s and one hangs, and 100 hostile messages arrive. Nothing may be lost,
no service may crash, and every hostile message is answered or dead-lettered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from emulator_process import ROOT

pytestmark = pytest.mark.integration


def test_the_short_chaos_run_loses_nothing(kafka_bootstrap: str, tmp_path: Path) -> None:
    out = tmp_path / "chaos.json"
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "chaos.py"), "--short", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=400, check=False)
    report = run.stdout[-6000:] + run.stderr[-3000:]
    assert out.exists(), report
    result = json.loads(out.read_text())
    rows = {row["fault"]: row for row in result["rows"]}
    assert result["lost"] == 0 and result["crashes"] == 0, report
    assert run.returncode == 0, report
    assert len(rows) == 7 and all(row["sent"] > 0 for row in rows.values()), report
    for row in rows.values():
        assert row["LOST"] == 0 and row["answered once"] + row["DLQ"] + row["dups discarded"] >= row["sent"], report
    assert "dispatcher restart x1" in rows["SIGKILL dispatcher d1"]["restarts"], report
    (poison,) = [row["poison"] for row in rows.values() if "poison" in row]
    assert poison["LOST"] == 0 and poison["dead-lettered"] == poison["expected"]["dead_letter"], report
