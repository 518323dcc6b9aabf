"""The Redis prefix index against the in-memory reference: same operations, same observations."""

from __future__ import annotations

from collections.abc import AsyncIterator

import numpy as np
import pytest

from dispatcher.prefix_index import (
    Clear,
    InMemoryPrefixIndex,
    Insert,
    Match,
    RemoveWorker,
    SetCapacity,
    conformance_ops,
    replay,
)
from dispatcher.redis_prefix_index import RedisPrefixIndex
from lodestar.hashing import trace_block_hashes
from lodestar.names import RedisKeys
from lodestar.redis_io import make_redis
from lodestar.settings import Settings

pytestmark = pytest.mark.integration


@pytest.fixture
async def store(isolated_service_settings: Settings) -> AsyncIterator[RedisPrefixIndex]:
    client = make_redis(isolated_service_settings)
    index = RedisPrefixIndex(client, RedisKeys(isolated_service_settings.redis.key_prefix), capacity_blocks=32)
    try:
        yield index
    finally:
        await index.clear()
        await client.aclose()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_batched_replay_matches_the_in_memory_store(store: RedisPrefixIndex, seed: int) -> None:
    ops = conformance_ops(seed, n_ops=1500)
    expected = replay(InMemoryPrefixIndex(32), ops)
    assert any(isinstance(o, tuple) and any(o) for o in expected)  # the sequence does match things
    assert await store.apply(ops) == expected


async def test_one_op_per_round_trip_matches_too(store: RedisPrefixIndex) -> None:
    ops = conformance_ops(11, n_ops=300)
    expected = replay(InMemoryPrefixIndex(32), ops)
    got = []
    for op in ops:
        got.extend(await store.apply([op]))
    assert got == expected


async def test_batch_apis_answer_like_single_ops(store: RedisPrefixIndex) -> None:
    ref = InMemoryPrefixIndex(32)
    chains = [tuple(trace_block_hashes([p] * 3 + list(range(k)))) for p in (1, 2) for k in (2, 6)]
    inserts = [("a", chains[0]), ("b", chains[1]), ("a", chains[3])]
    for wid, chain in inserts:
        ref.insert(wid, chain, 5.0)
    await store.insert_many(inserts, 5.0)
    got = await store.match_many(chains, ["a", "b", "c"])
    want = np.stack([ref.match(c, ["a", "b", "c"]) for c in chains])
    np.testing.assert_array_equal(got, want)
    assert got[3].tolist() == [9, 0, 0] and got[1].tolist() == [5, 9, 0]
    assert await store.size("a") == ref.size("a")


async def test_capacities_set_together_act_like_one_by_one(store: RedisPrefixIndex) -> None:
    ref = InMemoryPrefixIndex(32)
    chains = {w: tuple(trace_block_hashes(list(range(k, k + 8)))) for k, w in enumerate(("a", "b", "c"))}
    for wid, chain in chains.items():
        ref.insert(wid, chain, 1.0)
    await store.insert_many(chains.items(), 1.0)
    for wid, cap in {"a": 3, "b": 0, "c": 20}.items():
        ref.set_capacity(wid, cap)
    await store.set_capacities({"a": 3, "b": 0, "c": 20})
    assert [await store.size(w) for w in chains] == [ref.size(w) for w in chains] == [3, 0, 8]
    with pytest.raises(ValueError):
        await store.set_capacities({"a": 1, "b": -1})


async def test_capacity_evicts_least_recent_then_deepest(store: RedisPrefixIndex) -> None:
    old, new = tuple(trace_block_hashes([1, 2, 3, 4])), tuple(trace_block_hashes([9, 8, 7]))
    ops = [SetCapacity("w", 5), Insert("w", old, 1.0), Insert("w", new, 2.0), Match(old, ("w",)),
           Match(new, ("w",))]
    # 7 blocks into 5: the two deepest blocks of the least recently used chain go
    assert (await store.apply(ops))[3:] == [(2,), (3,)]
    await store.remove_worker("w")
    assert await store.size("w") == 0


async def _holders(store: RedisPrefixIndex, keys: RedisKeys) -> tuple[dict[bytes, set[str]], dict[bytes, set[str]]]:
    """(the holders sets as stored, the holders each worker's own set implies): chain root -> workers."""
    client = store._r  # noqa: SLF001 - the store's own keys, read back
    stored: dict[bytes, set[str]] = {}
    async for key in client.scan_iter(match=keys.prefix_holders + "*", count=1000):
        stored[key[len(keys.prefix_holders):]] = {m.decode() for m in await client.smembers(key)}
    implied: dict[bytes, set[str]] = {}
    async for key in client.scan_iter(match=keys.prefix_index("x")[:-1] + "w*", count=1000):
        wid = key.decode().rsplit(":", 1)[1]
        for member in await client.zrange(key, 0, -1):
            if member[:4] == b"\xff\xff\xff\xff":  # depth 0: a chain's root
                implied.setdefault(member, set()).add(wid)
    return stored, implied


async def test_root_holders_follow_inserts_evictions_and_removals(isolated_service_settings: Settings,
                                                                  store: RedisPrefixIndex) -> None:
    """The match only gallops through the holders of a chain's root: they must be exactly the workers whose
    set holds it after any sequence (none leaked by evictions, removals or clears)."""
    keys = RedisKeys(isolated_service_settings.redis.key_prefix)
    ops = [op for op in conformance_ops(5, n_ops=1500) if not isinstance(op, Clear)]
    assert any(isinstance(op, RemoveWorker) for op in ops)
    await store.apply(ops)
    stored, implied = await _holders(store, keys)
    assert implied and stored == implied
    await store.remove_worker("w1")
    stored, implied = await _holders(store, keys)
    assert stored == implied and all("w1" not in ws for ws in stored.values())
    await store.clear()
    assert await _holders(store, keys) == ({}, {})
