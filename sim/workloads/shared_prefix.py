"""Synthetic shared-prefix requests (SGLang's generated-shared-prefix dataset and Preble-style presets)."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from sim.workloads.arrivals import ArrivalProcess
from sim.workloads.blocks import layered_block_hashes
from sim.workloads.request import WorkloadRequest
from sim.workloads.sampling import new_key, random_len, zipf_weights
from sim.workloads.spec import SharedPrefixSpec


def shared_prefix_requests(spec: SharedPrefixSpec, seed: int) -> Iterator[WorkloadRequest]:
    """The request stream of a shared-prefix workload, deterministic in `seed`."""
    shapes = np.random.default_rng([seed, 3])
    keys = np.random.default_rng([seed, 4])
    arrivals = ArrivalProcess(spec.rate, np.random.default_rng([seed, 1]), spec.rate_changes(), spec.burstiness)
    group_keys = [new_key(keys) for _ in range(spec.num_groups)]
    group_lens = [random_len(shapes, spec.system_prompt_len, spec.range_ratio) for _ in range(spec.num_groups)]
    bt = spec.block_tokens

    def make(i: int, arrival: float, group: int | None) -> WorkloadRequest:
        question_len = random_len(shapes, spec.question_len, spec.range_ratio)
        output_len = random_len(shapes, spec.output_len, spec.range_ratio)
        if group is None:
            prompt_len = random_len(shapes, spec.system_prompt_len, spec.range_ratio) + question_len
            layers = [(new_key(keys), prompt_len)]
        else:
            prompt_len = group_lens[group] + question_len
            layers = [(group_keys[group], group_lens[group]), (new_key(keys), prompt_len)]
        return WorkloadRequest(f"r{i}", arrival, prompt_len, layered_block_hashes(layers, prompt_len, bt), bt,
                               output_len)

    if spec.prompts_per_group is not None:
        order = np.repeat(np.arange(spec.num_groups), spec.prompts_per_group)
        np.random.default_rng([seed, 5]).shuffle(order)
        for i, group in enumerate(order):
            arrival = arrivals.next()
            if spec.duration_s is not None and arrival >= spec.duration_s:
                return
            yield make(i, arrival, int(group))
        return

    picks = np.random.default_rng([seed, 5])
    weights = (zipf_weights(spec.num_groups, spec.zipf_alpha) if spec.popularity == "zipf"
               else np.full(spec.num_groups, 1.0 / spec.num_groups))
    cumulative = np.cumsum(weights)
    share_changes = spec.prefix_share_changes()
    share, next_change = spec.share, 0
    i = 0
    while True:
        arrival = arrivals.next()
        if spec.duration_s is not None and arrival >= spec.duration_s:
            return
        while next_change < len(share_changes) and arrival >= share_changes[next_change].at_s:
            share = share_changes[next_change].share
            next_change += 1
        shared = picks.random() < share
        group = min(int(np.searchsorted(cumulative, picks.random(), side="right")), spec.num_groups - 1)
        yield make(i, arrival, group if shared else None)
        i += 1
