"""Prefix property of the chained block hashes."""

from __future__ import annotations

import random

import numpy as np
import pytest
import xxhash

from lodestar.hashing import ROOT_SEED, text_block_hashes, token_block_hashes, trace_block_hashes


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


def test_token_blocks_hash_the_ids_as_4_byte_unsigned_integers() -> None:
    """The wire format of the chain (hashes live in Redis, shared by dispatchers of any version): each
    block is its ids as uint32 in machine order, the first seeded with ROOT_SEED."""
    ids = [0, 1, 31_999, 2**32 - 1, 7, 8, 9, 10, 123_456, 5, 4, 3]
    raw = np.asarray(ids, dtype=np.uint32).tobytes()
    seed, want = ROOT_SEED, []
    for i in range(0, 12 * 4, 16):
        seed = xxhash.xxh64_intdigest(raw[i:i + 16], seed)
        want.append(seed)
    assert token_block_hashes(ids, 4) == want
    assert token_block_hashes(np.asarray(ids, dtype=np.int64), 4) == want  # an array of ids too
    for bad in (-1, 2**32):
        with pytest.raises(OverflowError):
            token_block_hashes([1, bad, 2, 3], 4)
