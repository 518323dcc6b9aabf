"""Cluster files (`configs/clusters/*.yaml`): which engines a simulated cluster runs, and their ids.

    name: hetero-4a30-4v100
    workers:
      - {gpu: A30, model: llama-3.1-8b, count: 4}
      - {gpu: V100, count: 4}

Worker ids are the lower-cased GPU type and a per-type counter: `a30-0` ... `a30-3`, `v100-0` ...
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from lodestar.hardware import gpu, model


class WorkerGroup(BaseModel):
    """`count` identical engines: one GPU type serving one model, with optional engine overrides."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gpu: str
    model: str = "llama-3.1-8b"
    count: PositiveInt = 1
    engine: dict[str, Any] = Field(default_factory=dict)

    @field_validator("gpu")
    @classmethod
    def _known_gpu(cls, v: str) -> str:
        return gpu(v).name

    @field_validator("model")
    @classmethod
    def _known_model(cls, v: str) -> str:
        return model(v).name


class WorkerSpec(BaseModel):
    """One engine of the cluster."""

    model_config = ConfigDict(frozen=True)

    worker_id: str
    gpu: str
    model: str
    engine: dict[str, Any] = Field(default_factory=dict)


class ClusterSpec(BaseModel):
    """A named list of worker groups."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    workers: tuple[WorkerGroup, ...] = Field(min_length=1)

    def expand(self) -> list[WorkerSpec]:
        """One WorkerSpec per engine, in file order, with ids like `h100-0`."""
        counters: dict[str, int] = {}
        out = []
        for group in self.workers:
            prefix = group.gpu.lower()
            for _ in range(group.count):
                k = counters.get(prefix, 0)
                counters[prefix] = k + 1
                out.append(WorkerSpec(worker_id=f"{prefix}-{k}", gpu=group.gpu, model=group.model,
                                      engine=dict(group.engine)))
        return out


def read_cluster(path: str | Path) -> ClusterSpec:
    """Read and validate a cluster YAML file; the file's stem names it unless `name` is set."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a cluster file is one YAML mapping")
    data.setdefault("name", path.stem)
    return ClusterSpec.model_validate(data)
