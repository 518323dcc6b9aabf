"""Load a script of scripts/ as a module (the scripts are entry points, not a package)."""

from __future__ import annotations

import importlib.util
from types import ModuleType

from lodestar.settings import PROJECT_ROOT


def load_script(name: str) -> ModuleType:
    """scripts/<name>.py, imported under `name`."""
    path = PROJECT_ROOT / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
