"""The prefix index semantics: longest prefix, per-worker capacity, LRU with documented tie-breaks."""

from __future__ import annotations

import numpy as np
import pytest

from dispatcher.prefix_index import (
    Clear,
    InMemoryPrefixIndex,
    Insert,
    Match,
    PrefixIndex,
    RemoveWorker,
    SetCapacity,
    Size,
    conformance_ops,
    replay,
)
from lodestar.hashing import trace_block_hashes


class ReferenceIndex:
    """The documented semantics taken literally (dicts and a linear scan), to check the fast store."""

    def __init__(self, capacity_blocks: int):
        self.default = capacity_blocks
        self.capacity: dict[str, int] = {}
        self.entries: dict[str, dict[int, tuple[float, int]]] = {}

    def insert(self, worker_id: str, block_hashes, now: float) -> None:
        held = self.entries.setdefault(worker_id, {})
        for depth, h in enumerate(block_hashes):
            held[h] = (max(held[h][0], now), held[h][1]) if h in held else (now, depth)
        self._evict(worker_id)

    def _evict(self, worker_id: str) -> None:
        held = self.entries.get(worker_id, {})
        while len(held) > self.capacity.get(worker_id, self.default):
            del held[min(held, key=lambda h: (held[h][0], -held[h][1], h))]

    def match(self, block_hashes, worker_ids) -> np.ndarray:
        out = []
        for w in worker_ids:
            held, n = self.entries.get(w, {}), 0
            for h in block_hashes:
                if h not in held:
                    break
                n += 1
            out.append(n)
        return np.array(out, dtype=np.int64)

    def set_capacity(self, worker_id: str, capacity_blocks: int) -> None:
        self.capacity[worker_id] = capacity_blocks
        self._evict(worker_id)

    def remove_worker(self, worker_id: str) -> None:
        self.entries.pop(worker_id, None)
        self.capacity.pop(worker_id, None)

    def clear(self) -> None:
        self.entries.clear()
        self.capacity.clear()

    def size(self, worker_id: str) -> int:
        return len(self.entries.get(worker_id, {}))


def chain(*ids: int) -> tuple[int, ...]:
    return tuple(trace_block_hashes(ids))


def test_both_stores_satisfy_the_protocol() -> None:
    assert isinstance(InMemoryPrefixIndex(8), PrefixIndex)
    assert isinstance(ReferenceIndex(8), PrefixIndex)


def test_match_counts_leading_blocks_per_worker() -> None:
    index = InMemoryPrefixIndex(100)
    index.insert("w0", chain(1, 2, 3, 4, 5), now=1.0)
    index.insert("w1", chain(1, 2, 9), now=1.0)
    request = chain(1, 2, 3, 7)
    assert index.match(request, ["w0", "w1", "w2"]).tolist() == [3, 2, 0]
    assert index.match(chain(8, 2, 3), ["w0", "w1"]).tolist() == [0, 0]
    assert index.match((), ["w0"]).tolist() == [0]
    assert index.match(request, []).tolist() == []


def test_match_stops_at_the_first_miss_even_if_later_blocks_are_held() -> None:
    index = InMemoryPrefixIndex(100)
    index.insert("w0", (11, 12, 13, 14), now=0.0)
    assert index.match((11, 99, 13, 14), ["w0"]).tolist() == [1]


def test_least_recently_used_chain_is_evicted_first() -> None:
    index = InMemoryPrefixIndex(4)
    a, b, c = chain(1, 2), chain(3, 4), chain(5, 6)
    index.insert("w", a, now=1.0)
    index.insert("w", b, now=2.0)
    index.insert("w", c, now=3.0)
    assert index.size("w") == 4
    assert [index.match(x, ["w"])[0] for x in (a, b, c)] == [0, 2, 2]


def test_reinserting_refreshes_last_use() -> None:
    index = InMemoryPrefixIndex(4)
    a, b, c = chain(1, 2), chain(3, 4), chain(5, 6)
    index.insert("w", a, now=1.0)
    index.insert("w", b, now=2.0)
    index.insert("w", a, now=3.0)
    index.insert("w", c, now=4.0)
    assert [index.match(x, ["w"])[0] for x in (a, b, c)] == [2, 0, 2]


def test_matching_does_not_refresh_last_use() -> None:
    index = InMemoryPrefixIndex(4)
    a, b, c = chain(1, 2), chain(3, 4), chain(5, 6)
    index.insert("w", a, now=1.0)
    index.insert("w", b, now=2.0)
    index.match(a, ["w"])
    index.insert("w", c, now=3.0)
    assert [index.match(x, ["w"])[0] for x in (a, b, c)] == [0, 2, 2]


def test_equal_last_use_evicts_the_deepest_block_first() -> None:
    index = InMemoryPrefixIndex(3)
    long = chain(1, 2, 3, 4, 5)
    index.insert("w", long, now=1.0)
    assert index.size("w") == 3
    assert index.match(long, ["w"]).tolist() == [3]


def test_equal_last_use_and_depth_evicts_the_smaller_hash_first() -> None:
    index = InMemoryPrefixIndex(3)
    p, q = chain(10, 11), chain(20, 21)
    index.insert("w", p, now=1.0)
    index.insert("w", q, now=1.0)
    survivor, victim = (p, q) if p[1] > q[1] else (q, p)
    assert index.match(survivor, ["w"]).tolist() == [2]
    assert index.match(victim, ["w"]).tolist() == [1]


def test_last_use_never_moves_back_in_time() -> None:
    index = InMemoryPrefixIndex(4)
    a, b, c = chain(1, 2), chain(3, 4), chain(5, 6)
    index.insert("w", a, now=5.0)
    index.insert("w", b, now=1.0)
    index.insert("w", a, now=2.0)  # a skewed clock: a keeps last use 5
    index.insert("w", c, now=3.0)
    assert [index.match(x, ["w"])[0] for x in (a, b, c)] == [2, 0, 2]


def test_capacity_is_per_worker_and_shrinking_evicts_at_once() -> None:
    index = InMemoryPrefixIndex(10)
    index.set_capacity("small", 2)
    long = chain(*range(8))
    index.insert("small", long, now=1.0)
    index.insert("big", long, now=1.0)
    assert index.match(long, ["small", "big"]).tolist() == [2, 8]
    index.set_capacity("big", 5)
    assert index.size("big") == 5
    assert index.match(long, ["big"]).tolist() == [5]
    index.set_capacity("big", 0)
    assert index.size("big") == 0


def test_remove_worker_forgets_only_that_worker() -> None:
    index = InMemoryPrefixIndex(10)
    index.set_capacity("w0", 1)
    a = chain(1, 2, 3)
    index.insert("w0", a, now=1.0)
    index.insert("w1", a, now=1.0)
    index.remove_worker("w0")
    assert index.size("w0") == 0
    assert index.match(a, ["w0", "w1"]).tolist() == [0, 3]
    index.insert("w0", a, now=2.0)  # back with the default capacity
    assert index.match(a, ["w0"]).tolist() == [3]
    index.clear()
    assert index.match(a, ["w0", "w1"]).tolist() == [0, 0]


def test_replay_records_one_observation_per_operation() -> None:
    a = chain(1, 2, 3)
    ops = [SetCapacity("w", 2), Insert("w", a, 1.0), Match(a, ("w", "x")), Size("w"), RemoveWorker("w"),
           Size("w"), Clear()]
    assert replay(InMemoryPrefixIndex(5), ops) == [None, None, (2, 0), 2, None, 0, None]


def test_conformance_ops_are_reproducible_and_exercise_eviction() -> None:
    ops = conformance_ops(seed=3, n_ops=400)
    assert ops == conformance_ops(seed=3, n_ops=400)
    assert ops != conformance_ops(seed=4, n_ops=400)
    observations = replay(InMemoryPrefixIndex(16), ops)
    matches = [o for op, o in zip(ops, observations, strict=True) if isinstance(op, Match)]
    assert any(any(0 < m < len(op.block_hashes) for m in o)
               for op, o in zip([op for op in ops if isinstance(op, Match)], matches, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_in_memory_store_equals_the_literal_semantics(seed: int) -> None:
    ops = conformance_ops(seed=seed, n_ops=1500)
    assert replay(InMemoryPrefixIndex(16), ops) == replay(ReferenceIndex(16), ops)


def test_heap_compaction_keeps_the_semantics() -> None:
    ops = [SetCapacity("w", 64)]
    a = chain(*range(40))
    for t in range(200):  # each re-touch leaves 40 stale heap entries behind
        ops.append(Insert("w", a, float(t)))
        ops.append(Insert("w", chain(1000 + t, 1), float(t)))
        ops.append(Match(a, ("w",)))
    assert replay(InMemoryPrefixIndex(64), ops) == replay(ReferenceIndex(64), ops)
