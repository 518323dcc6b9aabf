"""The command line every generated doc shares: write it, or with --check report whether the committed one is
current (its test checks the same; the flag is for a shell or CI step)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path


def generate(output: Path, render: Callable[[], str], doc: str | None, argv: list[str] | None = None) -> int:
    """Write `render()` to `output`, or with --check exit 1 if `output` differs from it."""
    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    parser.add_argument("--check", action="store_true", help=f"exit 1 if {output.name} is out of date")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = output.read_text() if output.exists() else ""
        if current != text:
            print(f"{output} is out of date: run {Path(sys.argv[0]).name}", file=sys.stderr)
            return 1
        return 0
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    print(f"wrote {output}")
    return 0
