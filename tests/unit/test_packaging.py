"""The installed package (what the container image and the Helm chart run) carries every data file its
modules read: each non-Python file inside a package is declared as package data in pyproject.toml."""

from __future__ import annotations

import fnmatch
import tomllib

from lodestar.settings import PROJECT_ROOT


def test_every_data_file_inside_a_package_is_package_data() -> None:
    config = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    declared = config.get("package-data", {})
    roots = {pattern.rstrip("*") for pattern in config["packages"]["find"]["include"]}
    missing = []
    for root in roots:
        for path in (PROJECT_ROOT / root).rglob("*"):
            if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
                continue
            package = ".".join(path.parent.relative_to(PROJECT_ROOT).parts)
            if not any(fnmatch.fnmatch(path.name, p) for p in declared.get(package, [])):
                missing.append(str(path.relative_to(PROJECT_ROOT)))
    assert missing == [], f"not installed with the package (add to [tool.setuptools.package-data]): {missing}"
