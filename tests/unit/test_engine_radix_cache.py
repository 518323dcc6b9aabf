"""The block radix cache: matching, splitting, reference counts and LRU eviction."""

from __future__ import annotations

import random

from lodestar.hashing import trace_block_hashes
from sim.engine.radix_cache import BlockRadixCache


def chain(*ids: int) -> list[int]:
    return trace_block_hashes(list(ids))


def test_match_insert_and_split():
    c = BlockRadixCache()
    a = chain(1, 2, 3, 4)
    c.insert(a, 16)
    assert c.total_tokens == 64 == c.evictable_tokens
    assert c.cached_blocks(chain(1, 2, 9)) == 2
    k, node = c.match_prefix(chain(1, 2, 9))  # ends mid-run: the run is split
    assert k == 2 and len(c) == 2
    c.insert(chain(1, 2, 7, 8), 16)  # shares two blocks
    assert c.total_tokens == 96 and len(c) == 3
    assert c.cached_blocks(a) == 4 and c.cached_blocks(chain(1, 2, 7, 8, 5)) == 4
    assert c.cached_blocks(a, limit=3) == 3


def test_lru_evicts_least_recently_used_unreferenced_first():
    c = BlockRadixCache()
    for first in (1, 2, 3):
        c.insert(chain(first, 10 * first), 16)  # three separate two-block runs: 1, then 2, then 3
    c.match_prefix(chain(1, 10))  # 1 is now the most recently used
    assert c.evict(32) == 32
    assert c.cached_blocks(chain(2, 20)) == 0  # the oldest went first
    assert c.cached_blocks(chain(1, 10)) == 2 and c.cached_blocks(chain(3, 30)) == 2
    _, node = c.match_prefix(chain(3, 30))
    c.lock(node)  # referenced: not evictable even though 1 is older now
    assert c.evict(10_000) == 32
    assert c.cached_blocks(chain(3, 30)) == 2 and c.cached_blocks(chain(1, 10)) == 0
    assert c.evictable_tokens == 0 and c.protected_tokens == 32
    c.unlock(node)
    assert c.evictable_tokens == 32


def test_leaves_go_before_their_parents():
    c = BlockRadixCache()
    c.insert(chain(1, 2), 16)
    c.insert(chain(1, 2, 3, 4), 16)
    c.insert(chain(1, 2, 5), 16)
    c.match_prefix(chain(1, 2, 3, 4))
    # path 1,2 was touched last, but its children must be evicted before it
    assert c.evict(16) == 16
    assert c.cached_blocks(chain(1, 2, 5)) == 2
    assert c.evict(32) == 32  # then the 3,4 run
    assert c.cached_blocks(chain(1, 2, 3)) == 2
    assert c.evict(32) == 32 and len(c) == 0


def test_random_operations_keep_accounting_consistent():
    rng = random.Random(11)
    c = BlockRadixCache()
    held: list[int] = []
    for _ in range(3000):
        op = rng.random()
        ids = [rng.randint(1, 3)] + [rng.randint(1, 4) for _ in range(rng.randint(0, 6))]
        if op < 0.4:
            c.insert(chain(*ids), 16)
        elif op < 0.6:
            k, node = c.match_prefix(chain(*ids))
            if k:
                c.lock(node)
                held.append(node)
        elif op < 0.8 and held:
            c.unlock(held.pop(rng.randrange(len(held))))
        else:
            c.evict(rng.randint(1, 100))
        total = sum(c.node_tokens(n) for n in c._seg if n != 0)
        assert total == c.total_tokens
        assert sum(c.node_tokens(n) for n in c._lru) == c.evictable_tokens
        position = {n: i for i, n in enumerate(c._lru)}
        for n in c._lru:  # every unreferenced node's children are unreferenced and older
            assert all(position.get(ch, len(position)) < position[n] for ch in c._children[n].values())


def test_clone_is_independent():
    c = BlockRadixCache()
    c.insert(chain(1, 2, 3), 16)
    d = c.clone()
    d.evict(100)
    d.insert(chain(4), 16)
    assert c.cached_blocks(chain(1, 2, 3)) == 3 and c.cached_blocks(chain(4)) == 0
    assert d.cached_blocks(chain(1)) == 0 and d.cached_blocks(chain(4)) == 1
