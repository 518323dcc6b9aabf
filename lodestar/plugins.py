"""Plugins found by looking: every class of a package's modules that has a given name attribute.

The policy registry (dispatcher/policies/registry.py) and the model-family registry
(learner/models/registry.py) are this over their own package, so adding a plugin is adding a module, and
an interface never imports its plugins (they import it: no import cycle).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class UnknownName(KeyError):
    """A name no registry knows; the message lists the known ones (and prints without KeyError's quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _is_plugin(obj: Any, module: str, key: str, methods: Sequence[str]) -> bool:
    return (inspect.isclass(obj) and obj.__module__ == module and isinstance(getattr(obj, key, None), str)
            and all(callable(getattr(obj, m, None)) for m in methods))


def find_classes(package: str, directory: Path, key: str, methods: Sequence[str]) -> dict[str, type]:
    """Classes defined in the modules of `package` (at `directory`, subpackages included) that have a str
    attribute `key` and the callables `methods`, by the value of `key`, sorted; a name twice is an error."""
    found: dict[str, type] = {}
    for info in pkgutil.walk_packages([str(directory)], f"{package}."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, lambda o, m=module.__name__: _is_plugin(o, m, key, methods)):
            name = getattr(cls, key)
            if name in found:
                raise ValueError(f"{key} {name!r} is defined twice: {found[name].__module__}, {cls.__module__}")
            found[name] = cls
    return dict(sorted(found.items()))


def lookup(classes: dict[str, type], name: str, what: str) -> type:
    """`classes[name]`, or UnknownName listing the known names."""
    try:
        return classes[name]
    except KeyError:
        raise UnknownName(f"unknown {what} {name!r}; known: {', '.join(classes)}") from None
