"""The environment variable of every setting, for the tests that check deployment files (compose.yaml, the
Helm chart) set only real settings: a renamed setting then breaks the build instead of being ignored."""

from __future__ import annotations

from pydantic import BaseModel

from lodestar.settings import Settings


def settings_env_names() -> set[str]:
    """LODESTAR_<SECTION>__<KEY> for each field of each section, LODESTAR_<KEY> for top-level fields."""
    names: set[str] = set()
    for field_name, field in Settings.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            for inner in sub.model_fields:
                names.add(f"LODESTAR_{field_name}__{inner}".upper())
        else:
            names.add(f"LODESTAR_{field_name}".upper())
    return names
