"""One request of a workload stream, as the simulator feeds it to the router and an engine."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WorkloadRequest:
    """A request with its arrival time and prefix block chain (block i covers tokens [i*B, (i+1)*B)).

    `output_block_hashes` continues the chain over the whole blocks that prompt + answer complete, when
    the workload knows the answer's content (multi-turn sessions, whose next turn contains it).
    """

    rid: str
    arrival_s: float
    prompt_len: int
    block_hashes: tuple[int, ...]
    block_tokens: int
    max_new_tokens: int
    session_id: str | None = None
    output_block_hashes: tuple[int, ...] = ()
