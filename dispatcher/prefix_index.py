"""The router-side prefix index: per worker, which prefix blocks the router believes its engine caches.

A router cannot see the engines' radix caches; like SGLang's cache-aware router, AIBrix's prefix-cache
indexer and llm-d's prefix-cache scorer, it keeps an approximate copy built from its own routing
history: after routing a request to a worker, the caller inserts the request's chained block hashes
(lodestar.hashing) for that worker. Equal chained hash means equal prefix, so the longest cached prefix
of a request on a worker is the number of its leading block hashes that worker's set holds.

One semantics (`PrefixIndex`, below, is the contract) with two stores: `InMemoryPrefixIndex` here (the
simulator and unit tests) and a Redis store (live dispatchers, shared by all replicas). The two are held
to the same observations on the same operation sequence: `conformance_ops` builds such a sequence and
`replay` applies it to any store, so `replay(redis_store, ops) == replay(InMemoryPrefixIndex(c), ops)`.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from lodestar.hashing import trace_block_hashes


@runtime_checkable
class PrefixIndex(Protocol):
    """Per-worker, capacity-bounded LRU sets of chained block hashes. The exact semantics:

    State: for each worker, a set of entries `hash -> (last_use, depth)` and a capacity in blocks
    (`set_capacity`, else the store's default capacity). `depth` is the block's position in the chain
    it was first inserted with (block 0 has depth 0); for chained hashes it is a property of the hash.

    `insert(worker_id, block_hashes, now)`: `block_hashes` is a chain starting at block 0. For each
    position i, the entry for `block_hashes[i]` gets `last_use = max(previous last_use, now)` (a new
    entry gets `now` and depth i; an existing entry keeps its depth). Then, while the worker holds more
    entries than its capacity, the entry with the smallest key `(last_use, -depth, hash)` is evicted:
    least recently used first; among equal last use, the deepest block first (a chain loses its tail
    before its head, as a radix cache evicts leaves); then the smaller hash value. Because every insert
    touches a whole chain from block 0 and last use only grows, a block is never evicted before the
    deeper blocks of its chain: each worker's set stays closed under prefixes.

    `match(block_hashes, worker_ids)`: for each listed worker (in order), the number of leading hashes
    of `block_hashes` its set holds, stopping at the first miss; unknown workers match 0. Read-only:
    matching does not touch last use (only routing, through `insert`, does).

    `set_capacity(worker_id, capacity_blocks)`: the worker's capacity from now on (>= 0); if it holds
    more entries, the eviction rule above runs at once. `remove_worker`: forget the worker entirely
    (entries and capacity). `clear`: `remove_worker` for every worker. `size(worker_id)`: its number of
    entries.

    A store may apply operations in batches (the Redis store: one round trip, pipelined or one Lua
    script); a batch must be observably equal to applying its operations one by one, in order. Hints for
    a Redis store: a sorted set per worker scored by last use (`ZADD GT` gives the max rule); keep the
    depth with the member (e.g. member = depth and hash packed, matched at depth i by position) so the
    eviction tie-break can be applied to the lowest-score group; `ZMSCORE` answers a match in one call.
    """

    def match(self, block_hashes: Sequence[int], worker_ids: Sequence[str]) -> np.ndarray:
        """Matched leading blocks of `block_hashes` per worker in `worker_ids` (int64 array)."""
        ...

    def insert(self, worker_id: str, block_hashes: Sequence[int], now: float) -> None:
        """Touch or add the chain's blocks for `worker_id` at time `now`, then evict down to capacity."""
        ...

    def set_capacity(self, worker_id: str, capacity_blocks: int) -> None:
        """Set `worker_id`'s capacity in blocks, evicting at once if it holds more."""
        ...

    def remove_worker(self, worker_id: str) -> None:
        """Forget everything about `worker_id`."""
        ...

    def clear(self) -> None:
        """Forget everything about every worker."""
        ...

    def size(self, worker_id: str) -> int:
        """Number of blocks held for `worker_id`."""
        ...


@dataclass(slots=True)
class _WorkerBlocks:
    """One worker's entries, and the same entries grouped by last use for eviction."""

    bit: int
    entries: dict[int, tuple[float, int]] = field(default_factory=dict)  # hash -> (last_use, depth)
    # last_use -> [(-depth, hash)]: every touch appends; items whose entry moved on are stale.
    buckets: dict[float, list[tuple[int, int]]] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # heap of the bucket keys
    queued: int = 0  # items in all buckets, stale included


class InMemoryPrefixIndex:
    """The reference store: dicts per worker, eviction candidates grouped by last use.

    `match` costs one dict lookup per matched block whatever the number of workers (a global map from
    hash to a bitmask of the workers holding it). `insert` costs a few dict operations per block: a
    touched block is appended to the bucket of its new last use; eviction takes the oldest bucket,
    sorted by (-depth, hash), and skips items a later touch made stale. Buckets are rebuilt from the
    live entries when stale items outnumber them.
    """

    def __init__(self, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self.capacity_blocks = capacity_blocks
        self._capacity: dict[str, int] = {}
        self._workers: dict[str, _WorkerBlocks] = {}
        self._holders: dict[int, int] = {}  # hash -> bitmask of worker bits
        self._free_bits: list[int] = []

    def _worker(self, worker_id: str) -> _WorkerBlocks:
        w = self._workers.get(worker_id)
        if w is None:
            bit = heapq.heappop(self._free_bits) if self._free_bits else len(self._workers)
            w = self._workers[worker_id] = _WorkerBlocks(bit)
        return w

    def match(self, block_hashes: Sequence[int], worker_ids: Sequence[str]) -> np.ndarray:
        """Matched leading blocks of `block_hashes` per worker in `worker_ids` (int64 array)."""
        known = [self._workers.get(w) for w in worker_ids]
        bits = [None if w is None else w.bit for w in known]
        alive = 0
        for b in bits:
            if b is not None:
                alive |= 1 << b
        matched: dict[int, int] = {}
        holders = self._holders
        n = 0
        for h in block_hashes:
            if not alive:
                break
            present = holders.get(h, 0)
            dropped = alive & ~present
            while dropped:
                low = dropped & -dropped
                matched[low.bit_length() - 1] = n
                dropped ^= low
            alive &= present
            n += 1
        while alive:
            low = alive & -alive
            matched[low.bit_length() - 1] = n
            alive ^= low
        return np.array([0 if b is None else matched[b] for b in bits], dtype=np.int64)

    def insert(self, worker_id: str, block_hashes: Sequence[int], now: float) -> None:
        """Touch or add the chain's blocks for `worker_id` at time `now`, then evict down to capacity."""
        w = self._worker(worker_id)
        mask = 1 << w.bit
        entries, holders = w.entries, self._holders
        bucket = w.buckets.get(now)
        if bucket is None:
            bucket = w.buckets[now] = []
            heapq.heappush(w.times, now)
        queued = len(bucket)
        for depth, h in enumerate(block_hashes):
            old = entries.get(h)
            if old is None:
                entries[h] = (now, depth)
                bucket.append((-depth, h))
                holders[h] = holders.get(h, 0) | mask
            elif old[0] < now:
                entries[h] = (now, old[1])
                bucket.append((-old[1], h))
        w.queued += len(bucket) - queued
        self._evict_to_capacity(worker_id, w)
        if w.queued > 2 * len(entries) + 1024:
            self._rebuild_buckets(w)

    @staticmethod
    def _rebuild_buckets(w: _WorkerBlocks) -> None:
        buckets: dict[float, list[tuple[int, int]]] = {}
        for h, (t, d) in w.entries.items():
            buckets.setdefault(t, []).append((-d, h))
        w.buckets, w.times, w.queued = buckets, list(buckets), len(w.entries)
        heapq.heapify(w.times)

    def _evict_to_capacity(self, worker_id: str, w: _WorkerBlocks) -> None:
        entries = w.entries
        excess = len(entries) - self._capacity.get(worker_id, self.capacity_blocks)
        keep = ~(1 << w.bit)
        holders = self._holders
        while excess > 0:
            t = w.times[0]
            bucket = w.buckets[t]
            bucket.sort(reverse=True)  # the next victim, smallest (-depth, hash), at the end
            while excess > 0 and bucket:
                _, h = bucket.pop()
                w.queued -= 1
                entry = entries.get(h)
                if entry is None or entry[0] != t:
                    continue  # a later touch moved it to a newer bucket (or it is gone)
                del entries[h]
                rest = holders[h] & keep
                if rest:
                    holders[h] = rest
                else:
                    del holders[h]
                excess -= 1
            if not bucket:
                del w.buckets[t]
                heapq.heappop(w.times)

    def set_capacity(self, worker_id: str, capacity_blocks: int) -> None:
        """Set `worker_id`'s capacity in blocks, evicting at once if it holds more."""
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self._capacity[worker_id] = capacity_blocks
        self._evict_to_capacity(worker_id, self._worker(worker_id))

    def remove_worker(self, worker_id: str) -> None:
        """Forget everything about `worker_id`."""
        self._capacity.pop(worker_id, None)
        w = self._workers.pop(worker_id, None)
        if w is None:
            return
        keep = ~(1 << w.bit)
        holders = self._holders
        for h in w.entries:
            rest = holders[h] & keep
            if rest:
                holders[h] = rest
            else:
                del holders[h]
        heapq.heappush(self._free_bits, w.bit)

    def clear(self) -> None:
        """Forget everything about every worker."""
        self._capacity.clear()
        self._workers.clear()
        self._holders.clear()
        self._free_bits.clear()

    def size(self, worker_id: str) -> int:
        """Number of blocks held for `worker_id`."""
        w = self._workers.get(worker_id)
        return 0 if w is None else len(w.entries)


# Operation log: a store-independent record of operations, for conformance between stores.


@dataclass(frozen=True, slots=True)
class Insert:
    worker_id: str
    block_hashes: tuple[int, ...]
    now: float


@dataclass(frozen=True, slots=True)
class Match:
    block_hashes: tuple[int, ...]
    worker_ids: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class SetCapacity:
    worker_id: str
    capacity_blocks: int


@dataclass(frozen=True, slots=True)
class RemoveWorker:
    worker_id: str


@dataclass(frozen=True, slots=True)
class Clear:
    pass


@dataclass(frozen=True, slots=True)
class Size:
    worker_id: str


Op = Insert | Match | SetCapacity | RemoveWorker | Clear | Size
Observation = tuple[int, ...] | int | None


def replay(index: PrefixIndex, ops: Sequence[Op]) -> list[Observation]:
    """Apply `ops` in order; one observation per op: a Match's counts, a Size's count, else None."""
    out: list[Observation] = []
    for op in ops:
        match op:
            case Insert(worker_id, block_hashes, now):
                index.insert(worker_id, block_hashes, now)
                out.append(None)
            case Match(block_hashes, worker_ids):
                out.append(tuple(int(x) for x in index.match(block_hashes, worker_ids)))
            case SetCapacity(worker_id, capacity_blocks):
                index.set_capacity(worker_id, capacity_blocks)
                out.append(None)
            case RemoveWorker(worker_id):
                index.remove_worker(worker_id)
                out.append(None)
            case Clear():
                index.clear()
                out.append(None)
            case Size(worker_id):
                out.append(index.size(worker_id))
            case _:
                raise TypeError(f"not a prefix index operation: {op!r}")
    return out


def conformance_ops(
    seed: int,
    n_ops: int = 2000,
    n_workers: int = 4,
    n_prefixes: int = 6,
    max_blocks: int = 24,
    capacity_range: tuple[int, int] = (8, 48),
) -> list[Op]:
    """A reproducible operation sequence that exercises every rule of the semantics.

    Requests share a few prefixes and grow like multi-turn sessions; capacities are small so eviction
    runs constantly; clock values repeat (equal last use: the depth and hash tie-breaks decide) and
    sometimes step back (skewed dispatcher clocks: the max rule decides). Workers are removed and
    re-added, capacities change, and the whole index is cleared once in a while.
    """
    rng = random.Random(seed)
    workers = [f"w{i}" for i in range(n_workers)]
    prefixes = [[rng.getrandbits(32) for _ in range(rng.randint(1, max_blocks // 2))] for _ in range(n_prefixes)]
    sessions: list[list[int]] = []
    ops: list[Op] = [SetCapacity(w, rng.randint(*capacity_range)) for w in workers]
    now = 0.0
    for _ in range(n_ops):
        r = rng.random()
        if r < 0.5:
            now += rng.choice((0.0, 0.0, 1.0, 2.5, 10.0))
        elif r < 0.55:
            now -= rng.choice((1.0, 5.0))
        roll = rng.random()
        if roll < 0.45 or not sessions:
            if sessions and rng.random() < 0.4:
                ids = rng.choice(sessions)
                ids.extend(rng.getrandbits(32) for _ in range(rng.randint(1, 4)))
            else:
                ids = list(rng.choice(prefixes)) + [rng.getrandbits(32) for _ in range(rng.randint(0, 8))]
                sessions.append(ids)
            chain = tuple(trace_block_hashes(ids[:max_blocks]))
            ops.append(Insert(rng.choice(workers), chain, now))
        elif roll < 0.85:
            ids = rng.choice(sessions + [list(p) for p in prefixes])
            cut = rng.randint(0, len(ids) + 2)
            ids = ids[:cut] + [rng.getrandbits(32) for _ in range(rng.randint(0, 3))]
            subset = tuple(rng.sample(workers + ["ghost"], rng.randint(1, n_workers + 1)))
            ops.append(Match(tuple(trace_block_hashes(ids[:max_blocks])), subset))
        elif roll < 0.93:
            ops.append(Size(rng.choice(workers)))
        elif roll < 0.98:
            ops.append(SetCapacity(rng.choice(workers), rng.randint(0, capacity_range[1])))
        elif roll < 0.997:
            ops.append(RemoveWorker(rng.choice(workers)))
        else:
            ops.append(Clear())
    return ops
