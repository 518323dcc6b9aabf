"""Constructor parameters as validated, documented settings.

A policy, a model family or the learner's config declares each parameter once, in its constructor:

    def __init__(self, threshold: Annotated[float, Field(ge=0, description="...")] = 0.3, seed: int = 0): ...

`params_model(cls)` turns that signature into a pydantic model (unknown names refused, types coerced,
bounds checked), so values from settings, YAML or the command line are validated against the very
constructor they go to, and `describe(cls)` reads the same annotations back for the generated reference
(docs/policies.md). Parameters the code supplies itself (a run's `seed`, an input layout) are left out
by name.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import annotated_types
from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError, create_model
from pydantic.fields import FieldInfo

_BOUNDS = ((annotated_types.Ge, "ge", ">="), (annotated_types.Gt, "gt", ">"),
           (annotated_types.Le, "le", "<="), (annotated_types.Lt, "lt", "<"))


class ParamsError(ValueError):
    """Parameters that do not fit a constructor; the message names the owner and every bad field."""


@dataclass(frozen=True, slots=True)
class Param:
    """One documented constructor parameter."""

    name: str
    type_text: str
    default: Any
    description: str


def type_text(annotation: Any) -> str:
    """A type as a reader writes it: `float`, `int | None`, `tuple[int, ...]` (Annotated metadata dropped)."""
    if typing.get_origin(annotation) is typing.Annotated:
        return type_text(typing.get_args(annotation)[0])
    if annotation is None or annotation is type(None):
        return "None"
    if annotation is SecretStr:
        return "secret"
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_text(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join("..." if a is Ellipsis else type_text(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return getattr(annotation, "__name__", str(annotation))


def bounds_text(field: FieldInfo) -> str:
    """The field's bounds, e.g. `>= 1, < 2` ('' when unbounded)."""
    return ", ".join(f"{symbol} {getattr(m, attr)}" for m in field.metadata for kind, attr, symbol in _BOUNDS
                     if isinstance(m, kind))


def _signature(cls: type, exclude: frozenset[str]) -> list[tuple[str, Any, Any]]:
    """(name, annotation, default) of the keyword parameters of `cls`'s constructor, in order."""
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    out = []
    for name, p in inspect.signature(cls).parameters.items():
        if name in exclude or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is p.empty:
            raise TypeError(f"{cls.__name__}.{name} has no default: every parameter must have one")
        out.append((name, hints.get(name, Any), p.default))
    return out


@cache
def params_model(cls: type, exclude: frozenset[str] = frozenset()) -> type[BaseModel]:
    """A pydantic model of `cls`'s constructor parameters (but those in `exclude`); extra names refused."""
    fields: dict[str, Any] = {name: (annotation, default) for name, annotation, default in _signature(cls, exclude)}
    config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    return create_model(f"{cls.__name__}Params", __config__=config, **fields)


def validate_params(cls: type, params: Mapping[str, Any], *, owner: str,
                    exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The parameters given, validated against `cls`'s constructor and coerced to its types.

    Only the names given come back, so everything else keeps the constructor's own default. Raises
    ParamsError naming `owner` and, for each bad field, what is wrong and what it accepts.
    """
    if not isinstance(params, Mapping):
        raise ParamsError(f"{owner}: parameters must be a mapping of name to value, not {type(params).__name__}")
    model = params_model(cls, exclude)
    try:
        validated = model.model_validate(dict(params))
    except ValidationError as err:
        known = ", ".join(model.model_fields) or "none"
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(all)'}: {e['msg']}" for e in err.errors())
        raise ParamsError(f"{owner}: {problems} (parameters: {known})") from None
    return {name: getattr(validated, name) for name in validated.model_fields_set}


def describe(cls: type, exclude: frozenset[str] = frozenset()) -> list[Param]:
    """Every parameter of `cls`'s constructor (but those in `exclude`): type with bounds, default, description."""
    model = params_model(cls, exclude)
    out = []
    for name, annotation, default in _signature(cls, exclude):
        field = model.model_fields[name]
        bounds = bounds_text(field)
        text = type_text(annotation) + (f" ({bounds})" if bounds else "")
        out.append(Param(name, text, default, field.description or ""))
    return out
