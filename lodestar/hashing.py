"""Prefix block hashing: chained 64-bit xxhash over fixed-size blocks.

Block i's hash covers blocks 0..i (it is seeded with block i-1's hash), so equal hashes mean equal
prefixes and two chains diverge for good at the first differing block. Only whole blocks are hashed:
a trailing partial block is not cacheable as a unit, as in SGLang's paged radix cache.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

import xxhash

if array("I").itemsize != 4:  # pragma: no cover - every platform Lodestar runs on
    raise ImportError("lodestar.hashing needs the array module's 'I' to be 4 bytes")

ROOT_SEED = 0x10DE57A2


def _chain(blocks: Iterable[bytes], seed: int = ROOT_SEED) -> list[int]:
    out: list[int] = []
    append = out.append
    digest = xxhash.xxh64_intdigest
    for block in blocks:
        seed = digest(block, seed)
        append(seed)
    return out


def token_block_hashes(tokens: Sequence[int], tokens_per_block: int, salt: str | None = None) -> list[int]:
    """Chained hashes of the whole `tokens_per_block`-token blocks of a token sequence.

    A `salt` (SGLang's `cache_salt`) starts the chain from a seed of its own, so equal tokens under
    different salts share no hash."""
    if tokens_per_block < 1:
        raise ValueError("tokens_per_block must be >= 1")
    n_blocks = len(tokens) // tokens_per_block
    # 4-byte unsigned ids in machine order (what numpy's uint32 gave: the hashes are unchanged), converted
    # by the array module about 3x faster than by numpy for a Python list; ids outside uint32 raise
    raw = array("I", tokens[: n_blocks * tokens_per_block]).tobytes()
    step = 4 * tokens_per_block
    return _chain([raw[i : i + step] for i in range(0, n_blocks * step, step)], _seed(salt))


def _seed(salt: str | None) -> int:
    return ROOT_SEED if not salt else xxhash.xxh64_intdigest(salt.encode(), seed=ROOT_SEED)


def text_block_hashes(text: str, chars_per_block: int, salt: str | None = None) -> list[int]:
    """Chained hashes of the whole `chars_per_block`-character blocks of a text prompt (a `salt` as in
    `token_block_hashes`)."""
    if chars_per_block < 1:
        raise ValueError("chars_per_block must be >= 1")
    n_blocks = len(text) // chars_per_block
    return _chain(
        (text[i * chars_per_block : (i + 1) * chars_per_block].encode() for i in range(n_blocks)), _seed(salt)
    )


def trace_block_hashes(hash_ids: Sequence[int]) -> list[int]:
    """Chained hashes for a trace's per-block hash ids (Mooncake `hash_ids`), one per id."""
    return _chain(int(h).to_bytes(8, "little", signed=False) for h in hash_ids)
