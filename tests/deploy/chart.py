"""The Helm chart as the deploy tests see it: the pinned tools (scripts/chart_tools), each values file rendered
once per session, the containers of the rendered objects, and the vendored CRD schemas made strict."""

from __future__ import annotations

import copy
import functools
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from lodestar.settings import PROJECT_ROOT

CHART = PROJECT_ROOT / "deploy" / "helm" / "lodestar"
CHART_TOOLS = PROJECT_ROOT / "scripts" / "chart_tools"
CHECKOV_CONFIG = PROJECT_ROOT / "deploy" / "helm" / "checkov.yaml"
CRD_SCHEMAS = PROJECT_ROOT / "deploy" / "crd-schemas"
NAMESPACE = "lodestar"
RELEASE = "rel"
DEFAULT = "default"
# the values files every check runs on: the chart's defaults and each example
VALUES_FILES: dict[str, Path | None] = {DEFAULT: None} | {
    p.stem: p for p in sorted((CHART / "examples").glob("*.yaml"))}
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")  # the oldest the chart supports (Chart.yaml kubeVersion) and the newest
CUSTOM_KINDS = {
    ("keda.sh/v1alpha1", "ScaledObject"): CRD_SCHEMAS / "keda" / "keda.sh_scaledobjects.yaml",
    ("monitoring.coreos.com/v1", "ServiceMonitor"):
        CRD_SCHEMAS / "prometheus-operator" / "monitoring.coreos.com_servicemonitors.yaml",
}

Manifest = dict[str, Any]


@functools.cache
def tool(name: str) -> str:
    """Path of a pinned chart tool; a missing one FAILS the test with the command that installs it."""
    found = subprocess.run([str(CHART_TOOLS), "path", name], capture_output=True, text=True)
    if found.returncode != 0:
        pytest.fail(f"{name} is not installed ({found.stderr.strip()}); install the chart tools with "
                    f"`scripts/chart_tools install` (or `make setup`)", pytrace=False)
    return found.stdout.strip()


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the pinned helm on the chart (no cluster, no network)."""
    return subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)


def values_args(values: Path | None, *sets: str) -> list[str]:
    args = ["-f", str(values)] if values is not None else []
    for s in sets:
        args += ["--set", s]
    return args


def template(values: Path | None, *sets: str) -> subprocess.CompletedProcess[str]:
    return helm("template", RELEASE, str(CHART), "--namespace", NAMESPACE, *values_args(values, *sets))


@functools.cache
def rendered_text(name: str) -> str:
    """`helm template` of one of VALUES_FILES, once per session."""
    out = template(VALUES_FILES[name])
    assert out.returncode == 0, f"helm template ({name}) failed:\n{out.stderr}"
    return out.stdout


def parse(text: str) -> list[Manifest]:
    return [doc for doc in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if doc]


@functools.cache
def _rendered(name: str) -> list[Manifest]:
    return parse(rendered_text(name))


def rendered(name: str) -> list[Manifest]:
    """The objects one values file renders (a fresh copy: tests may change them)."""
    return copy.deepcopy(_rendered(name))


def find(docs: list[Manifest], kind: str, name: str) -> Manifest:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} rendered"
    return matches[0]


def pod_spec(doc: Manifest) -> dict[str, Any] | None:
    """The pod template's spec of a workload (None for other kinds)."""
    if doc["kind"] in ("Deployment", "StatefulSet", "Job", "DaemonSet"):
        return doc["spec"]["template"]["spec"]
    return None


def containers(docs: list[Manifest]) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    """Every (workload, container) pair, init containers included."""
    for doc in docs:
        spec = pod_spec(doc)
        if spec is not None:
            for c in spec.get("initContainers", []) + spec["containers"]:
                yield doc, c


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A container's env entries by name."""
    return {e["name"]: e for e in container.get("env", [])}


def strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema with unknown fields refused, as `kubectl apply --validate=strict` does: every
    object schema with `properties` gets additionalProperties: false unless it keeps unknown fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_validator(api_version: str, kind: str) -> jsonschema.Draft7Validator:
    """A validator of a custom kind against the strict schema of its vendored CRD (the version it names);
    built once, since checking a 75 kB schema costs more than validating an object with it."""
    crd = yaml.safe_load(CUSTOM_KINDS[(api_version, kind)].read_text())
    version = api_version.split("/")[1]
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict(served["schema"]["openAPIV3Schema"])
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def validate_custom(doc: Manifest) -> None:
    """Raise jsonschema.ValidationError if a custom resource does not match its CRD's schema."""
    crd_validator(doc["apiVersion"], doc["kind"]).validate(doc)
