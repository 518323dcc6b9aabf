"""Prefix property of the chained block hashes."""

from __future__ import annotations

import random

from lodestar.hashing import text_block_hashes, token_block_hashes, trace_block_hashes


def test_equal_prefixes_give_equal_chains() -> None:
    rng = random.Random(7)
    shared = [rng.randrange(50_000) for _ in range(64)]
    a = shared + [rng.randrange(50_000) for _ in range(40)]
    b = shared + [rng.randrange(50_000) for _ in range(40)]
    ha, hb = token_block_hashes(a, 16), token_block_hashes(b, 16)
    assert ha[:4] == hb[:4]


def test_chains_diverge_at_first_differing_block_for_good() -> None:
    base = list(range(160))
    changed = list(base)
    changed[40] += 1  # inside block 2 (tokens 32..47)
    ha, hb = token_block_hashes(base, 16), token_block_hashes(changed, 16)
    assert ha[:2] == hb[:2]
    assert all(x != y for x, y in zip(ha[2:], hb[2:], strict=True))


def test_same_block_content_at_other_position_hashes_differently() -> None:
    block = list(range(16))
    h = token_block_hashes(block + block, 16)
    assert h[0] != h[1]  # chaining: a block's hash depends on everything before it


def test_only_whole_blocks_are_hashed() -> None:
    assert len(token_block_hashes(list(range(47)), 16)) == 2
    assert token_block_hashes([], 16) == []
    assert len(text_block_hashes("x" * 130, 64)) == 2


def test_text_and_trace_chains_have_prefix_property() -> None:
    assert text_block_hashes("a" * 64 + "b" * 64, 64)[0] == text_block_hashes("a" * 64 + "c" * 64, 64)[0]
    t1, t2 = trace_block_hashes([5, 9, 11]), trace_block_hashes([5, 9, 12])
    assert t1[:2] == t2[:2] and t1[2] != t2[2]


def test_a_salt_gives_a_chain_of_its_own() -> None:
    ids = list(range(100))
    plain, salted, other = (token_block_hashes(ids, 1, s) for s in (None, "tenant-a", "tenant-b"))
    assert token_block_hashes(ids, 1, "") == plain  # an empty salt is no salt
    assert token_block_hashes(ids, 1, "tenant-a") == salted  # deterministic
    assert not set(plain) & set(salted) and not set(salted) & set(other)
