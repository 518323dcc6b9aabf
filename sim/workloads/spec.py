"""Workload files (`configs/workloads/*.yaml`): their schema, validated with pydantic.

Every workload has a `kind`, optional `duration_s` (arrivals at or after it are dropped) and optional
scheduled `events`: a request-rate change, a change of the fraction of requests that share a prefix,
or one worker slowing down. Paths are relative to `Settings().data_dir` unless absolute.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RateChange(_Spec):
    """From `at_s` on, arrivals come at `rate` per second (sessions per second for multi-turn)."""

    kind: Literal["rate"]
    at_s: float = Field(ge=0)
    rate: PositiveFloat


class PrefixShareChange(_Spec):
    """From `at_s` on, a fraction `share` of requests carries a shared (group) prefix."""

    kind: Literal["prefix_share"]
    at_s: float = Field(ge=0)
    share: float = Field(ge=0, le=1)


class Slowdown(_Spec):
    """From `at_s` on, worker `worker` (an id such as `h100-0`, or an index in the cluster) runs `factor` times
    slower."""

    kind: Literal["slowdown"]
    at_s: float = Field(ge=0)
    worker: str | int
    factor: PositiveFloat


Event = Annotated[RateChange | PrefixShareChange | Slowdown, Field(discriminator="kind")]


class _WorkloadSpec(_Spec):
    name: str = ""
    duration_s: PositiveFloat | None = None
    events: tuple[Event, ...] = ()

    def rate_changes(self) -> list[RateChange]:
        return sorted((e for e in self.events if isinstance(e, RateChange)), key=lambda e: e.at_s)

    def prefix_share_changes(self) -> list[PrefixShareChange]:
        return sorted((e for e in self.events if isinstance(e, PrefixShareChange)), key=lambda e: e.at_s)

    def slowdowns(self) -> list[Slowdown]:
        return sorted((e for e in self.events if isinstance(e, Slowdown)), key=lambda e: e.at_s)

    def _no_prefix_share_events(self) -> None:
        if self.prefix_share_changes():
            raise ValueError(f"{self.kind!r} workloads have no prefix-share knob; use kind: shared_prefix")


class _TraceSpec(_WorkloadSpec):
    path: Path
    max_input_tokens: PositiveInt | None = None
    output_scale: PositiveFloat = 1.0
    rate: PositiveFloat | None = None
    burstiness: PositiveFloat = 1.0
    multiplier: PositiveFloat = 1.0

    @model_validator(mode="after")
    def _check_timing(self) -> _TraceSpec:
        self._no_prefix_share_events()
        if self.rate is not None and self.multiplier != 1.0:
            raise ValueError("set either `rate` (Poisson re-timing) or `multiplier` (original timestamps "
                             "compressed by this factor), not both")
        if self.rate is None and self.rate_changes():
            raise ValueError("rate events need Poisson re-timing: set `rate`")
        return self


class MooncakeSpec(_TraceSpec):
    """Replay of a Mooncake trace (`{timestamp ms, input_length, output_length, hash_ids}` JSONL).

    Each hash id is a 512-token block in the trace; `tokens_per_block` rescales it (the Lodestar paper
    uses 50 for the conversation trace and 200 for the synthetic one, with `max_input_tokens: 10000`
    and `output_scale: 0.5`). Without `rate`, arrivals keep the trace timestamps divided by `multiplier`.
    """

    kind: Literal["mooncake"]
    tokens_per_block: PositiveInt = 512


class AzureSpec(_TraceSpec):
    """Replay of an Azure LLM inference trace 2023 (`TIMESTAMP,ContextTokens,GeneratedTokens` CSV).

    The trace has no prefix information, so every request's blocks are unique (of `block_tokens`).
    """

    kind: Literal["azure"]
    block_tokens: PositiveInt = 32


# Preble-style presets (Srivatsa et al., "Preble", ICLR 2025, workload study): long shared prompts and
# short outputs. The lengths are rounded approximations of the paper's per-workload averages, the
# popularity skew a Zipf over groups; they are presets of this generator, not replays of the datasets.
SHARED_PREFIX_PRESETS: dict[str, dict[str, Any]] = {
    # SGLang bench_serving `generated-shared-prefix` defaults (python/sglang/bench_serving.py).
    "sglang_gsp": dict(num_groups=64, prompts_per_group=16, system_prompt_len=2048, question_len=128,
                       output_len=256, range_ratio=1.0, popularity="uniform"),
    "preble_toolbench": dict(num_groups=200, system_prompt_len=1600, question_len=240, output_len=45,
                             range_ratio=0.5, popularity="zipf", zipf_alpha=1.1),
    "preble_embodied_agent": dict(num_groups=50, system_prompt_len=2100, question_len=200, output_len=16,
                                  range_ratio=0.5, popularity="zipf", zipf_alpha=1.1),
    "preble_programming": dict(num_groups=100, system_prompt_len=3700, question_len=170, output_len=190,
                               range_ratio=0.5, popularity="zipf", zipf_alpha=1.1),
    "preble_video_qa": dict(num_groups=400, system_prompt_len=8700, question_len=1100, output_len=4,
                            range_ratio=0.5, popularity="uniform"),
    "preble_loogle": dict(num_groups=100, system_prompt_len=9000, question_len=100, output_len=16,
                          range_ratio=0.5, popularity="zipf", zipf_alpha=0.8),
}


class SharedPrefixSpec(_WorkloadSpec):
    """Synthetic shared-prefix requests: a group's system prompt followed by a unique question.

    With `prompts_per_group` set, the stream is exactly num_groups x prompts_per_group requests in a
    shuffled order (as SGLang's bench_serving builds it); otherwise requests are drawn for ever, each
    with probability `share` from a group chosen by `popularity` and else with a unique prompt of the
    same shape. Lengths are drawn uniformly in [len * range_ratio, len]. `preset` fills unset fields.
    """

    kind: Literal["shared_prefix"]
    preset: str | None = None
    rate: PositiveFloat = 8.0
    burstiness: PositiveFloat = 1.0
    num_groups: PositiveInt = 64
    prompts_per_group: PositiveInt | None = None
    system_prompt_len: PositiveInt = 2048
    question_len: PositiveInt = 128
    output_len: PositiveInt = 256
    range_ratio: float = Field(1.0, gt=0, le=1)
    share: float = Field(1.0, ge=0, le=1)
    popularity: Literal["uniform", "zipf"] = "uniform"
    zipf_alpha: PositiveFloat = 1.0
    block_tokens: PositiveInt = 32

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("preset") is not None:
            try:
                preset = SHARED_PREFIX_PRESETS[data["preset"]]
            except KeyError:
                raise ValueError(f"unknown preset {data['preset']!r}; known: "
                                 f"{', '.join(sorted(SHARED_PREFIX_PRESETS))}") from None
            return {**preset, **data}
        return data

    @model_validator(mode="after")
    def _check_finite_stream(self) -> SharedPrefixSpec:
        if self.prompts_per_group is not None and self.prefix_share_changes():
            raise ValueError("prefix_share events need the unbounded stream: leave prompts_per_group unset")
        return self


class MultiTurnSpec(_WorkloadSpec):
    """Chat sessions whose context grows: turn k's prompt = turn k-1's prompt + its output + new user text.

    Sessions start at `session_rate` per second (Poisson); each has a number of turns uniform in
    [turns_min, turns_max]; turn k+1 arrives an exponential think time (mean `think_time_s`) after turn k
    (open loop: it does not wait for turn k's answer). Every session opens with one of
    `num_system_prompts` shared system prompts. A session ends early once its prompt would pass
    `max_context_tokens`.
    """

    kind: Literal["multi_turn"]
    session_rate: PositiveFloat = 1.0
    burstiness: PositiveFloat = 1.0
    turns_min: PositiveInt = 2
    turns_max: PositiveInt = 8
    think_time_s: PositiveFloat = 20.0
    num_system_prompts: PositiveInt = 8
    system_prompt_len: int = Field(1024, ge=0)
    user_len: PositiveInt = 200
    output_len: PositiveInt = 250
    range_ratio: float = Field(0.5, gt=0, le=1)
    max_context_tokens: PositiveInt = 16_000
    block_tokens: PositiveInt = 32

    @model_validator(mode="after")
    def _check(self) -> MultiTurnSpec:
        self._no_prefix_share_events()
        if self.turns_min > self.turns_max:
            raise ValueError("turns_min must be <= turns_max")
        return self


WorkloadSpec = Annotated[MooncakeSpec | AzureSpec | SharedPrefixSpec | MultiTurnSpec, Field(discriminator="kind")]


class _Holder(BaseModel):
    spec: WorkloadSpec


def parse_workload_spec(data: dict[str, Any]) -> MooncakeSpec | AzureSpec | SharedPrefixSpec | MultiTurnSpec:
    """Validate a workload mapping (one YAML document)."""
    return _Holder.model_validate({"spec": data}).spec


def read_workload_spec(path: str | Path) -> MooncakeSpec | AzureSpec | SharedPrefixSpec | MultiTurnSpec:
    """Read and validate a workload YAML file; the file's stem names the workload unless `name` is set."""
    path = Path(path)
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a workload file is one YAML mapping")
    data.setdefault("name", path.stem)
    return parse_workload_spec(data)
