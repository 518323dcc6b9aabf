"""Multi-turn chat sessions whose context grows turn after turn under one session id."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

import numpy as np

from sim.workloads.arrivals import ArrivalProcess
from sim.workloads.blocks import layered_block_hashes
from sim.workloads.request import WorkloadRequest
from sim.workloads.sampling import new_key, random_len
from sim.workloads.spec import MultiTurnSpec


def _session_turns(spec: MultiTurnSpec, start_s: float, system_len: int,
                   rng: np.random.Generator) -> list[tuple[float, int, int]]:
    """(arrival_s, prompt_len, max_new_tokens) of each turn: prompt_k = prompt_{k-1} + output_{k-1} + user_k."""
    n_turns = int(rng.integers(spec.turns_min, spec.turns_max + 1))
    turns = []
    context = system_len
    t = start_s
    for k in range(n_turns):
        prompt_len = context + random_len(rng, spec.user_len, spec.range_ratio)
        if prompt_len > spec.max_context_tokens and k > 0:
            break
        prompt_len = min(prompt_len, spec.max_context_tokens)
        output = random_len(rng, spec.output_len, spec.range_ratio)
        turns.append((t, prompt_len, output))
        context = prompt_len + output
        t += float(rng.exponential(spec.think_time_s))
    return turns


def multi_turn_requests(spec: MultiTurnSpec, seed: int) -> Iterator[WorkloadRequest]:
    """Turns of all sessions in arrival order, deterministic in `seed`."""
    starts = ArrivalProcess(spec.session_rate, np.random.default_rng([seed, 1]), spec.rate_changes(),
                            spec.burstiness)
    shapes = np.random.default_rng([seed, 3])
    keys = np.random.default_rng([seed, 4])
    systems = [(new_key(keys), spec.system_prompt_len) for _ in range(spec.num_system_prompts)]
    pending: list[tuple[float, int, int, int, int, int, int]] = []  # arrival, session, turn, prompt, out, key, sys
    bt = spec.block_tokens
    rid = 0
    session = 0
    next_start = starts.next()
    while True:
        while not pending or next_start <= pending[0][0]:
            if spec.duration_s is not None and next_start >= spec.duration_s:
                break
            system = int(shapes.integers(len(systems)))
            key = new_key(keys)
            turns = _session_turns(spec, next_start, systems[system][1], shapes)
            for turn, (t, prompt_len, output) in enumerate(turns):
                heapq.heappush(pending, (t, session, turn, prompt_len, output, key, system))
            session += 1
            next_start = starts.next()
        if not pending:
            return
        t, s, _, prompt_len, output, key, system = heapq.heappop(pending)
        if spec.duration_s is not None and t >= spec.duration_s:
            return
        sys_key, sys_len = systems[system]
        layers = [(sys_key, sys_len), (key, prompt_len)] if sys_len else [(key, prompt_len)]
        chain = layered_block_hashes(layers, prompt_len + output, bt)  # the answer is the next turn's context
        n_prompt = prompt_len // bt
        yield WorkloadRequest(f"r{rid}", t, prompt_len, chain[:n_prompt], bt, output, session_id=f"s{s}",
                              output_block_hashes=chain[n_prompt:])
        rid += 1
