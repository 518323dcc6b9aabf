"""Generate the values table of deploy/helm/lodestar/README.md from the `# --` comments of its values.yaml.

    .venv/bin/python scripts/gen_chart_readme.py           # rewrite the table in the README
    .venv/bin/python scripts/gen_chart_readme.py --check   # exit 1 if the table is out of date

A key is documented by the comment block directly above it that starts with `# -- `; its later `# ` lines
continue the text. The table lists every documented key with its dotted path, type, default and text,
between the README's `<!-- values-table:start -->` and `<!-- values-table:end -->` markers; the rest of the
README is written by hand. (helm-docs does the same with more options, but is a Go build of its own.)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

import yaml

from lodestar.settings import PROJECT_ROOT

CHART = PROJECT_ROOT / "deploy" / "helm" / "lodestar"
VALUES = CHART / "values.yaml"
README = CHART / "README.md"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
_KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.-]+):(?:\s|$)")
_DOC = "# -- "


@dataclass(frozen=True)
class Documented:
    """One documented key of values.yaml."""

    path: tuple[str, ...]
    text: str


def documented_keys(lines: list[str]) -> list[Documented]:
    """The keys that carry a `# --` comment, in file order, with their full paths."""
    found: list[Documented] = []
    stack: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    doc: list[str] | None = None
    for line in lines:
        stripped = line.strip()
        if stripped.startswith(_DOC):
            doc = [stripped[len(_DOC):]]
            continue
        if stripped.startswith("#") and doc is not None:
            doc.append(stripped.lstrip("#").strip())
            continue
        match = _KEY.match(line)
        if match is None or stripped.startswith("-"):
            if stripped:
                doc = None
            continue
        indent = len(match["indent"])
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match["key"]))
        if doc is not None:
            found.append(Documented(tuple(key for _, key in stack), " ".join(doc)))
        doc = None
    return found


def lookup(values: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        values = values[key]
    return values


def type_name(value: Any) -> str:
    for kind, name in ((bool, "bool"), (int, "int"), (float, "float"), (str, "string"), (list, "list"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "null" if value is None else type(value).__name__


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def table(values_text: str) -> str:
    """The markdown table of every documented key."""
    values = yaml.safe_load(values_text)
    keys = documented_keys(values_text.splitlines())
    prefixes = {k.path[:i] for k in keys for i in range(1, len(k.path))}
    rows = ["| key | type | default | description |", "| --- | --- | --- | --- |"]
    for key in keys:
        value = lookup(values, key.path)
        default = ("see the keys below" if key.path in prefixes
                   else f"`{json.dumps(value, separators=(', ', ': '))}`")
        rows.append(f"| `{'.'.join(key.path)}` | {type_name(value)} | {_cell(default)} | {_cell(key.text)} |")
    return "\n".join(rows)


def render(readme: str, values_text: str) -> str:
    """`readme` with the text between the markers replaced by the current table."""
    if START not in readme or END not in readme:
        raise ValueError(f"{README} needs the markers {START} and {END}")
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(values_text)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the README's table is out of date")
    args = parser.parse_args()
    current = README.read_text()
    text = render(current, VALUES.read_text())
    if args.check:
        if current != text:
            print(f"{README} is out of date: run scripts/gen_chart_readme.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(text)
    print(f"wrote {README}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
