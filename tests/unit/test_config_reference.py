"""docs/configuration.md is generated from the settings model and must match it."""

from __future__ import annotations

from types import ModuleType

from pydantic import BaseModel
from scripts_loader import load_script

from lodestar.settings import PROJECT_ROOT, Settings


def generator() -> ModuleType:
    return load_script("gen_config_reference")


def test_committed_reference_is_up_to_date() -> None:
    gen = generator()
    assert gen.OUTPUT.read_text() == gen.render(), "run: .venv/bin/python scripts/gen_config_reference.py"


def test_reference_lists_every_setting_with_its_env_var_and_default() -> None:
    text = generator().render()
    for name, field in Settings.model_fields.items():
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            for inner in section.model_fields:
                assert f"| `{name}.{inner}` | `LODESTAR_{name.upper()}__{inner.upper()}` |" in text
        else:
            assert f"| `{name}` | `LODESTAR_{name.upper()}` |" in text
    assert "| `kafka.request_partitions` | `LODESTAR_KAFKA__REQUEST_PARTITIONS` | int (>= 1) | `12` |" in text
    assert "| `learner.checkpoint_path` |" in text and "`<project>/.run/learner/checkpoint.json`" in text
    assert str(PROJECT_ROOT) not in text  # no machine-specific paths


def test_line_comments_become_descriptions() -> None:
    class Example(BaseModel):
        """An example."""

        plain: int = 1
        noted: str = "a # not a comment"  # the real comment

    assert generator().line_comments(Example) == {"noted": "the real comment"}
