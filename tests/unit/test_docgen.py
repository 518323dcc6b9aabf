"""scripts/docgen.py: the write-or-check command line the generated docs share."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from lodestar.settings import PROJECT_ROOT


def test_writes_then_checks_the_generated_file(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("docgen", PROJECT_ROOT / "scripts" / "docgen.py")
    assert spec is not None and spec.loader is not None
    docgen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(docgen)
    output = tmp_path / "docs" / "thing.md"
    text = "# Thing\n"

    assert docgen.generate(output, lambda: text, "Generate a thing.", ["--check"]) == 1  # missing
    assert docgen.generate(output, lambda: text, "Generate a thing.", []) == 0
    assert output.read_text() == text
    assert docgen.generate(output, lambda: text, "Generate a thing.", ["--check"]) == 0
    output.write_text(text + "edited by hand\n")
    assert docgen.generate(output, lambda: text, "Generate a thing.", ["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
