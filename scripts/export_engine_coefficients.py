"""Export the calibrated engine model's per-GPU step-time coefficients into the core, for routing.

    .venv/bin/python scripts/export_engine_coefficients.py           # rewrite lodestar/engine_coefficients.json
    .venv/bin/python scripts/export_engine_coefficients.py --check   # fail if the committed file is stale

The dispatcher may not import `sim/`, but its analytic TTFT estimate (lodestar/ttft_estimate.py) needs
what the engine model knows: each GPU's seconds per prefill token, the weight-read floor of a step, the
attention and decode terms, and SGLang's default chunked-prefill size for that GPU's memory. This script
derives them from `sim/engine/calibration.json` exactly as the engine model does (`StepCoefficients.build`,
`EngineConfig.resolved`) and writes them as plain numbers; tests/unit/test_ttft_estimate.py checks the
committed file against the engine model.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lodestar.hardware import GPUS, MODELS, gpu, model  # noqa: E402
from lodestar.ttft_estimate import COEFFICIENTS_FILE  # noqa: E402
from sim.engine.config import EngineConfig  # noqa: E402
from sim.engine.perf_model import GPUCalibration, StepCoefficients, load_calibration  # noqa: E402


def coefficients() -> dict[str, Any]:
    """{"models": {model: {gpu: {coefficient: value}}}} for every calibrated GPU and known model."""
    cal = load_calibration()
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model_name in sorted(MODELS):
        m = model(model_name)
        per_gpu: dict[str, dict[str, float]] = {}
        for gpu_name in sorted(cal["gpus"]):
            if gpu_name not in GPUS:
                continue
            g = gpu(gpu_name)
            coef = StepCoefficients.build(GPUCalibration.from_dict(cal["gpus"][gpu_name]), g, m)
            cfg = EngineConfig().resolved(g, m)
            row = {k: float(v) for k, v in dataclasses.asdict(coef).items()}
            row["chunked_prefill_size"] = float(cfg.chunked_prefill_size or cfg.max_prefill_tokens)
            row["max_prefill_tokens"] = float(cfg.max_prefill_tokens)
            per_gpu[gpu_name] = row
        out[model_name] = per_gpu
    return {"generated_by": "scripts/export_engine_coefficients.py from sim/engine/calibration.json",
            "models": out}


def render() -> str:
    return json.dumps(coefficients(), indent=1, sort_keys=True) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if the committed file differs")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not COEFFICIENTS_FILE.exists() or COEFFICIENTS_FILE.read_text() != text:
            print(f"{COEFFICIENTS_FILE} is stale: rerun scripts/export_engine_coefficients.py", file=sys.stderr)
            return 1
        print(f"{COEFFICIENTS_FILE} is current")
        return 0
    COEFFICIENTS_FILE.write_text(text)
    print(f"wrote {COEFFICIENTS_FILE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
