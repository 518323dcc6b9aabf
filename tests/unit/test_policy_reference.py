"""docs/policies.md is generated from the policy and model registries and must match them."""

from __future__ import annotations

from types import ModuleType

from scripts_loader import load_script

from dispatcher.policies.registry import RUN_PARAMS, policy_class, policy_names
from learner.models.registry import model_families
from lodestar.params import describe
from lodestar.settings import PROJECT_ROOT


def generator() -> ModuleType:
    return load_script("gen_policy_reference")


def test_committed_reference_is_up_to_date() -> None:
    gen = generator()
    assert gen.OUTPUT.read_text() == gen.render(), "run: .venv/bin/python scripts/gen_policy_reference.py"


def test_every_policy_family_and_parameter_is_documented() -> None:
    text = generator().render()
    for name in policy_names():
        assert f"### `{name}`" in text
        for p in describe(policy_class(name), RUN_PARAMS):
            assert f"| `{p.name}` | {p.type_text.replace('|', chr(92) + '|')} |" in text
    for family in model_families():
        assert f"### `learned_{family}`" in text and f"[`learned_{family}`](#learned_{family})" in text
    assert "| `cache_threshold` | float (>= 0, <= 1) | `0.3` |" in text
    assert "| `learner.snapshot_every_events` | int (>= 1) | `1000` |" in text
    assert str(PROJECT_ROOT) not in text  # no machine-specific paths


def test_the_source_paragraph_is_the_cited_one() -> None:
    gen = generator()
    lmetric = gen.source_paragraph(policy_class("lmetric"))
    assert lmetric.startswith("Source: vllm-project/aibrix pkg/plugins/gateway/algorithms/l_metric_local.go")
    assert gen.source_paragraph(policy_class("gpu_speed_queue")) == ""
