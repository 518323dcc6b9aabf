"""Constructor parameters as settings (lodestar/params.py) and plugins found by looking (lodestar/plugins.py)."""

from __future__ import annotations

from typing import Annotated

import pytest
from pydantic import Field

from lodestar.params import ParamsError, bounds_text, describe, params_model, type_text, validate_params
from lodestar.plugins import UnknownName, find_classes, lookup


class Knobs:
    """A class whose constructor declares its parameters."""

    def __init__(
        self,
        threshold: Annotated[float, Field(ge=0, le=1, description="a fraction")] = 0.3,
        sizes: Annotated[tuple[int, ...], Field(description="layer widths")] = (8, 8),
        label: str | None = None,
        seed: int = 0,
    ):
        self.threshold, self.sizes, self.label, self.seed = threshold, sizes, label, seed


RUN = frozenset({"seed"})


def test_only_the_given_parameters_come_back_validated_and_coerced() -> None:
    assert validate_params(Knobs, {}, owner="k", exclude=RUN) == {}
    assert validate_params(Knobs, {"threshold": "0.5", "sizes": [4, 2]}, owner="k", exclude=RUN) == {
        "threshold": 0.5, "sizes": (4, 2)}


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"threshold": 2}, "k: threshold: Input should be less than or equal to 1"),
        ({"threshold": "high"}, "k: threshold: Input should be a valid number"),
        ({"seed": 1}, "k: seed: Extra inputs are not permitted (parameters: threshold, sizes, label)"),
        ({"sizes": [1], "treshold": 0.1}, "treshold: Extra inputs are not permitted"),
        ([("threshold", 1)], "k: parameters must be a mapping of name to value, not list"),
    ],
)
def test_bad_parameters_are_refused_with_the_field_and_the_reason(params, reason: str) -> None:
    with pytest.raises(ParamsError) as info:
        validate_params(Knobs, params, owner="k", exclude=RUN)
    assert reason in str(info.value)


def test_describe_reads_types_bounds_defaults_and_descriptions() -> None:
    rows = {p.name: p for p in describe(Knobs, RUN)}
    assert list(rows) == ["threshold", "sizes", "label"]
    assert (rows["threshold"].type_text, rows["threshold"].default, rows["threshold"].description) == (
        "float (>= 0, <= 1)", 0.3, "a fraction")
    assert rows["sizes"].type_text == "tuple[int, ...]" and rows["label"].type_text == "str | None"
    assert bounds_text(params_model(Knobs, RUN).model_fields["threshold"]) == ">= 0, <= 1"
    assert type_text(dict[str, dict[str, int]]) == "dict[str, dict[str, int]]"


def test_a_parameter_without_default_is_refused() -> None:
    class NoDefault:
        def __init__(self, x: int):
            self.x = x

    with pytest.raises(TypeError, match="NoDefault.x has no default"):
        params_model(NoDefault)


def test_an_unknown_name_lists_the_known_ones_without_quotes() -> None:
    with pytest.raises(UnknownName) as info:
        lookup({"a": int, "b": str}, "c", "thing")
    assert str(info.value) == "unknown thing 'c'; known: a, b"


def test_plugins_are_found_in_every_module_and_a_name_twice_is_an_error(tmp_path, monkeypatch) -> None:
    package = tmp_path / "plugpkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "interface.py").write_text("class Base:\n    name: str\n")  # annotated only: no plugin
    (package / "one.py").write_text("from plugpkg.interface import Base\nclass A(Base):\n    name = 'a'\n"
                                    "    def run(self): ...\nclass Helper:\n    name = 'h'\n")  # no run(): skipped
    (package / "sub" / "two.py").write_text("class B:\n    name = 'b'\n    def run(self): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    found = find_classes("plugpkg", package, "name", ("run",))
    assert list(found) == ["a", "b"] and found["b"].__module__ == "plugpkg.sub.two"
    (package / "three.py").write_text("class C:\n    name = 'a'\n    def run(self): ...\n")
    with pytest.raises(ValueError, match="name 'a' is defined twice: plugpkg.one, plugpkg.three"):
        find_classes("plugpkg", package, "name", ("run",))
