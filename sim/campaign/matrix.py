"""The campaign's matrix, read from configs/campaign.yaml and validated before anything runs.

The file names the policies once, as labelled specs (`{label, policy, params}`, sim.policy_factory's
PolicySpec): `learned` (the policy under test), `oracle`, the `baselines` and the model `families`
compared with `learned`. Baselines and families may come from the registries (`registry: true`: every
heuristic of dispatcher/policies/, every `learned_<family>` of learner/models/ but the default one), so a
new policy module or model family joins the campaign without an edit here. Then two matrices, the full
one (`matrix`) and a smoke subset (`quick`), each a list of scenarios (cluster x workload x rate, with
their duration, seeds, baselines, oracle, family comparison, learning curve and shift time) whose unset
fields come from the matrix's `defaults`; and the pass/fail `criteria` (sim/campaign/criteria.py).

Every error names where it is (`matrix.scenarios.3.rate: ...`): unknown keys, policies, parameters,
labels, clusters and workloads, and a shift time that is not an event of the workload.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dispatcher.policies.registry import heuristic_names
from learner.models.registry import model_families
from lodestar.settings import PROJECT_ROOT, Settings
from sim.campaign.criteria import Criteria
from sim.cluster import read_cluster
from sim.policy_factory import LEARNED, PolicySpec, check_spec
from sim.workloads import read_workload_spec

CONFIG = PROJECT_ROOT / "configs" / "campaign.yaml"
CLUSTERS = PROJECT_ROOT / "configs" / "clusters"
WORKLOADS = PROJECT_ROOT / "configs" / "workloads"
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # labels and file stems: they name files of the run cache


class CampaignError(ValueError):
    """A campaign file that does not validate; the message lists every problem with its place."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpecConfig(_Model):
    """One policy of the campaign: `label` names its runs, `policy` says what runs, with `params`."""

    label: str = Field(pattern=NAME, max_length=64)
    policy: str = Field(max_length=64)
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _builds(self) -> SpecConfig:
        try:
            check_spec(self.spec())
        except (KeyError, ValueError) as err:  # UnknownName, ParamsError: a message that names the problem
            raise ValueError(str(err).strip("'\"")) from None
        return self

    def spec(self) -> PolicySpec:
        return PolicySpec(self.label, self.policy, dict(self.params))


class PolicySet(_Model):
    """Policies from a registry (minus `exclude`) and labelled `specs`."""

    registry: bool = False
    exclude: tuple[str, ...] = ()
    specs: tuple[SpecConfig, ...] = ()

    def resolve(self, registered: Sequence[str], what: str) -> list[PolicySpec]:
        unknown = sorted(set(self.exclude) - set(registered))
        if unknown:
            raise ValueError(f"exclude names {unknown}, which are not {what}: {', '.join(registered)}")
        named = [PolicySpec(p, p) for p in registered if p not in self.exclude] if self.registry else []
        return [*named, *(s.spec() for s in self.specs)]


class PoliciesConfig(_Model):
    learned: SpecConfig
    oracle: SpecConfig
    baselines: PolicySet
    families: PolicySet = PolicySet()


class ScenarioConfig(_Model):
    """One scenario as the file gives it (after its matrix's defaults are filled in)."""

    name: str | None = Field(None, pattern=NAME, description="folder of its runs; default cluster__workload__r<rate>")
    cluster: str = Field(pattern=NAME, description="file stem in configs/clusters")
    workload: str = Field(pattern=NAME, description="file stem in configs/workloads")
    rate: float = Field(gt=0, allow_inf_nan=False, description="arrival rate (sessions/s for multi-turn)")
    duration_s: float = Field(gt=0, allow_inf_nan=False)
    seeds: tuple[int, ...] = Field(min_length=1)
    baselines: Literal["all"] | tuple[str, ...] = Field(description="`all` or baseline labels")
    oracle: bool = Field(description="run the oracle, on the first seed")
    families: bool = Field(False, description="run the model families beside learned")
    curve: bool = Field(False, description="draw the learning curve from cold start")
    shift_at_s: float | None = Field(None, ge=0, allow_inf_nan=False, description="the workload's shift event")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, seeds: tuple[int, ...]) -> tuple[int, ...]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("seeds repeat")
        return seeds

    @field_validator("cluster")
    @classmethod
    def _cluster_file(cls, stem: str) -> str:
        path = CLUSTERS / f"{stem}.yaml"
        if not path.is_file():
            raise ValueError(f"no cluster file {path}")
        read_cluster(path)
        return stem

    @model_validator(mode="after")
    def _workload_and_shift(self) -> ScenarioConfig:
        path = WORKLOADS / f"{self.workload}.yaml"
        if not path.is_file():
            raise ValueError(f"no workload file {path}")
        events = sorted({e.at_s for e in read_workload_spec(path).events})
        if self.shift_at_s is not None and not any(math.isclose(self.shift_at_s, t) for t in events):
            raise ValueError(f"shift_at_s {self.shift_at_s:g} is not an event time of {self.workload} "
                             f"(events at {', '.join(f'{t:g}' for t in events) or 'none'})")
        return self


class MatrixConfig(_Model):
    defaults: dict[str, Any] = Field(default_factory=dict)
    scenarios: tuple[ScenarioConfig, ...] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _fill_defaults(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("defaults", {}), Mapping):
            defaults = data.get("defaults", {})
            unknown = sorted(set(defaults) - set(ScenarioConfig.model_fields))
            if unknown:
                raise ValueError(f"defaults: unknown keys {unknown}")
            scenarios = data.get("scenarios")
            if isinstance(scenarios, list):
                data = {**data, "scenarios": [{**defaults, **s} if isinstance(s, Mapping) else s for s in scenarios]}
        return data


class CampaignConfig(_Model):
    policies: PoliciesConfig
    criteria: Criteria
    matrix: MatrixConfig
    quick: MatrixConfig


@dataclass(frozen=True, slots=True)
class Scenario:
    """One cluster x workload x rate, resolved: every policy it runs is a label of the campaign's specs."""

    slug: str  # the folder of its runs and results
    cluster: str
    workload: str
    rate: float
    duration_s: float
    seeds: tuple[int, ...]
    baselines: tuple[str, ...]
    learned: str
    families: tuple[str, ...]  # compared with `learned`
    oracle: str | None  # run on the first seed
    curve: bool
    shift_at_s: float | None

    @property
    def cluster_path(self) -> Path:
        return CLUSTERS / f"{self.cluster}.yaml"

    @property
    def workload_path(self) -> Path:
        return WORKLOADS / f"{self.workload}.yaml"

    @property
    def title(self) -> str:
        return f"{self.cluster} / {self.workload} @ {self.rate:g}/s"

    @property
    def policies(self) -> list[str]:
        """The labels run under every seed."""
        return [*self.baselines, self.learned, *self.families]

    @property
    def runs(self) -> list[tuple[str, int]]:
        """Every (label, seed) the scenario needs."""
        return [*((p, s) for p in self.policies for s in self.seeds),
                *([(self.oracle, self.seeds[0])] if self.oracle else [])]


@dataclass(frozen=True, slots=True)
class Campaign:
    """A validated campaign file, one of its matrices chosen."""

    specs: Mapping[str, PolicySpec]  # by label
    baselines: tuple[str, ...]  # every baseline label, in the file's order
    criteria: Criteria
    scenarios: tuple[Scenario, ...]


def _resolve(config: CampaignConfig, quick: bool) -> Campaign:
    """Specs by label and the scenarios with their labels; ValueError (with the place) on a cross-reference."""
    pol = config.policies
    default_family = f"{LEARNED}_{Settings().learner.model}"
    families = [f"{LEARNED}_{f}" for f in model_families() if f"{LEARNED}_{f}" != default_family]
    try:
        baselines = pol.baselines.resolve(heuristic_names(), "heuristics of the dispatcher's registry")
    except ValueError as err:
        raise CampaignError(f"policies.baselines: {err}") from None
    try:
        family_specs = pol.families.resolve(families, "model families other than the default")
    except ValueError as err:
        raise CampaignError(f"policies.families: {err}") from None
    every = [pol.learned.spec(), pol.oracle.spec(), *baselines, *family_specs]
    for spec in every:  # those from the registries take the settings' parameters: check them too
        try:
            check_spec(spec)
        except (KeyError, ValueError) as err:
            raise CampaignError(f"policies: {spec.label}: {str(err).strip(chr(39))}") from None
    labels = [s.label for s in every]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise CampaignError(f"policies: labels must be unique, {repeated} repeat")
    if not baselines:
        raise CampaignError("policies.baselines: no baseline")
    base_labels = tuple(s.label for s in baselines)
    where = "quick" if quick else "matrix"
    scenarios: list[Scenario] = []
    for i, sc in enumerate((config.quick if quick else config.matrix).scenarios):
        chosen = base_labels if sc.baselines == "all" else sc.baselines
        unknown = sorted(set(chosen) - set(base_labels))
        if unknown:
            raise CampaignError(f"{where}.scenarios.{i}.baselines: {unknown} are not baselines of the campaign "
                                f"({', '.join(base_labels)})")
        scenarios.append(Scenario(
            slug=sc.name or f"{sc.cluster}__{sc.workload}__r{sc.rate:g}", cluster=sc.cluster, workload=sc.workload,
            rate=sc.rate, duration_s=sc.duration_s, seeds=sc.seeds, baselines=tuple(chosen),
            learned=pol.learned.label, families=tuple(s.label for s in family_specs) if sc.families else (),
            oracle=pol.oracle.label if sc.oracle else None, curve=sc.curve, shift_at_s=sc.shift_at_s))
    slugs = [s.slug for s in scenarios]
    repeated = sorted({s for s in slugs if slugs.count(s) > 1})
    if repeated:
        raise CampaignError(f"{where}.scenarios: {repeated} appear twice (give one a `name`)")
    return Campaign({s.label: s for s in every}, base_labels, config.criteria, tuple(scenarios))


def parse_campaign(data: Any, *, quick: bool = False, source: str = "campaign") -> Campaign:
    """Validate a campaign mapping (as read from YAML); CampaignError lists every problem."""
    try:
        config = CampaignConfig.model_validate(data)
    except ValidationError as err:
        problems = "\n".join(f"  {'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in err.errors())
        raise CampaignError(f"{source}: {err.error_count()} problem(s)\n{problems}") from None
    try:
        return _resolve(config, quick)
    except CampaignError as err:
        raise CampaignError(f"{source}: {err}") from None


def load_campaign(path: Path = CONFIG, *, quick: bool = False) -> Campaign:
    """Read and validate a campaign file; `quick` chooses its smoke matrix."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise CampaignError(f"{path}: not YAML: {err}") from None
    return parse_campaign(data, quick=quick, source=str(path))
