"""The Redis store of the router-side prefix index, shared by every dispatcher replica.

Same semantics as `dispatcher.prefix_index.PrefixIndex` (read its docstring), async, and batched: any
sequence of operations runs as one Lua script, i.e. one round trip, observably equal to applying the
operations one by one. The dispatcher sends one batch of matches and one batch of inserts per batch of
requests.

Layout: per worker a sorted set (`RedisKeys.prefix_index`) whose score is the block's last use and
whose member packs the depth and the hash as `(0xFFFFFFFF - depth, hash)` big-endian, so Redis's order
for equal scores (bytes, ascending) is the eviction tie-break: deepest block first, then smaller hash.
`ZADD GT` gives last use = max(previous, now), and eviction is `ZREMRANGEBYRANK 0 excess-1`.
Per-worker capacities live in one hash (`RedisKeys.prefix_capacity`); absent means the default.
A match finds the first missing block by galloping then bisecting, valid because every worker's set is
closed under prefixes (see the semantics), so a match costs O(log matched) lookups per worker.

Only the workers that hold a chain's first block can match any of it, so a match gallops through those
alone: per chain root (a depth-0 member) a set of its holders (`RedisKeys.prefix_holders` + member), and
per worker the set of its roots (`RedisKeys.prefix_roots` + id, to forget a removed worker's roots), kept
by inserts and evictions. A match then costs one SMEMBERS plus the holders' gallops instead of a lookup
in every listed worker's set (16k per batch of 64 requests at 256 workers, most of them misses). The
holders may only ever be a superset of the true ones (the gallop checks each), so a lost holders set
(e.g. evicted by a Redis under memory pressure) loses matches, never invents them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import redis.asyncio as aioredis

from dispatcher.prefix_index import (
    Clear,
    Insert,
    Match,
    Observation,
    Op,
    RemoveWorker,
    SetCapacity,
    Size,
)
from lodestar.names import RedisKeys

_MAX_DEPTH = 0xFFFFFFFF
_MEMBER = np.dtype([("depth", ">u4"), ("hash", ">u8")])

# KEYS[1] capacity hash, KEYS[1 + w] worker w's sorted set. ARGV[1] default capacity, ARGV[2] the worker
# ids (comma-separated, in slot order), ARGV[3] and ARGV[4] the starts of the holders and roots keys, then
# per operation a comma-separated spec and, for I and M, one binary argument holding the chain's 12-byte
# members back to back (few, large arguments: cheap to send):
#   I,w,now + members   insert        M,k,w1,..,wk + members   match (k results)
#   C,w,capacity        set capacity  R,w   remove worker       S,w   size (1 result)
# Returns the results as one comma-separated string (cheap to parse, unlike thousands of integers).
# The holders and roots keys are built here (a chain root's key holds its binary member), not in KEYS.
_APPLY = """
local cap_key = KEYS[1]
local default_cap = tonumber(ARGV[1])
local ids = {}
for id in string.gmatch(ARGV[2], '[^,]+') do ids[#ids + 1] = id end
local holders_key, roots_key = ARGV[3], ARGV[4]
local out = {}
local W = 12
local ROOT = string.rep(string.char(255), 4)  -- the depth marker of a chain's first block

local function forget_roots(w, members)
  for _, m in ipairs(members) do
    if string.sub(m, 1, 4) == ROOT then
      redis.call('SREM', holders_key .. m, ids[w])
      redis.call('SREM', roots_key .. ids[w], m)
    end
  end
end

local function evict(w)
  local cap = tonumber(redis.call('HGET', cap_key, ids[w]) or default_cap)
  local excess = redis.call('ZCARD', KEYS[1 + w]) - cap
  if excess > 0 then
    forget_roots(w, redis.call('ZRANGE', KEYS[1 + w], 0, excess - 1))
    redis.call('ZREMRANGEBYRANK', KEYS[1 + w], 0, excess - 1)
  end
end

local function member(blob, i)
  return string.sub(blob, (i - 1) * W + 1, i * W)
end

local function has(key, blob, i)
  return redis.call('ZSCORE', key, member(blob, i)) ~= false
end

local function leading(key, blob, n)
  if n == 0 or not has(key, blob, 1) then return 0 end
  local lo, hi = 1, 2
  while hi <= n and has(key, blob, hi) do
    lo = hi
    hi = hi * 2
  end
  if hi > n then
    if has(key, blob, n) then return n end
    hi = n
  end
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    if has(key, blob, mid) then lo = mid else hi = mid end
  end
  return lo
end

local specs = {}  -- a batch's matches share one spec string: split it once
local p = 5
while p <= #ARGV do
  local spec = specs[ARGV[p]]
  if spec == nil then
    spec = {}
    for field in string.gmatch(ARGV[p], '[^,]+') do spec[#spec + 1] = field end
    specs[ARGV[p]] = spec
  end
  local op = spec[1]
  if op == 'I' then
    local w, now, blob = tonumber(spec[2]), spec[3], ARGV[p + 1]
    local args = {}
    for i = 1, #blob / W do
      args[#args + 1] = now
      args[#args + 1] = member(blob, i)
      if #args >= 1000 then
        redis.call('ZADD', KEYS[1 + w], 'GT', unpack(args))
        args = {}
      end
    end
    if #args > 0 then redis.call('ZADD', KEYS[1 + w], 'GT', unpack(args)) end
    if #blob >= W then
      redis.call('SADD', holders_key .. member(blob, 1), ids[w])
      redis.call('SADD', roots_key .. ids[w], member(blob, 1))
    end
    evict(w)
    p = p + 2
  elseif op == 'M' then
    local k, blob = tonumber(spec[2]), ARGV[p + 1]
    local n = #blob / W
    local holding = {}
    if n > 0 then
      for _, id in ipairs(redis.call('SMEMBERS', holders_key .. member(blob, 1))) do holding[id] = true end
    end
    for j = 1, k do
      local w = tonumber(spec[2 + j])
      if holding[ids[w]] then out[#out + 1] = leading(KEYS[1 + w], blob, n) else out[#out + 1] = 0 end
    end
    p = p + 2
  elseif op == 'C' then
    local w = tonumber(spec[2])
    redis.call('HSET', cap_key, ids[w], spec[3])
    evict(w)
    p = p + 1
  elseif op == 'R' then
    local w = tonumber(spec[2])
    for _, m in ipairs(redis.call('SMEMBERS', roots_key .. ids[w])) do
      redis.call('SREM', holders_key .. m, ids[w])
    end
    redis.call('DEL', roots_key .. ids[w], KEYS[1 + w])
    redis.call('HDEL', cap_key, ids[w])
    p = p + 1
  elseif op == 'S' then
    out[#out + 1] = redis.call('ZCARD', KEYS[1 + tonumber(spec[2])])
    p = p + 1
  else
    return redis.error_reply('unknown prefix index operation ' .. tostring(op))
  end
end
return table.concat(out, ',')
"""


def _members(block_hashes: Sequence[int]) -> bytes:
    """The chain's sorted-set members, 12 bytes each (depth marker, hash; big-endian), back to back."""
    n = len(block_hashes)
    packed = np.empty(n, dtype=_MEMBER)
    packed["depth"] = _MAX_DEPTH - np.arange(n, dtype=np.int64)
    packed["hash"] = np.fromiter(block_hashes, dtype=np.uint64, count=n)
    return packed.tobytes()


class RedisPrefixIndex:
    """Per-worker, capacity-bounded LRU sets of chained block hashes in Redis, batched per round trip."""

    def __init__(self, client: aioredis.Redis, keys: RedisKeys, capacity_blocks: int):
        if capacity_blocks < 0:
            raise ValueError("capacity_blocks must be >= 0")
        self.capacity_blocks = capacity_blocks
        self._r = client
        self._keys = keys
        self._apply_script = client.register_script(_APPLY)

    async def apply(self, ops: Sequence[Op]) -> list[Observation]:
        """Apply `ops` in order, as `prefix_index.replay` would: one round trip per run of ops between
        `Clear`s. Returns one observation per op: a Match's counts, a Size's count, else None."""
        out: list[Observation] = []
        start = 0
        for i, op in enumerate([*ops, Clear()]):
            if isinstance(op, Clear):
                out.extend(await self._run(ops[start:i]))
                if i < len(ops):
                    await self.clear()
                    out.append(None)
                start = i + 1
        return out

    async def match_many(self, chains: Sequence[Sequence[int]], worker_ids: Sequence[str]) -> np.ndarray:
        """Matched leading blocks of every chain on every worker, shape (len(chains), len(worker_ids))."""
        if not chains or not worker_ids:
            return np.zeros((len(chains), len(worker_ids)), dtype=np.int64)
        wids = tuple(worker_ids)
        values, _ = await self._call([Match(tuple(c), wids) for c in chains])
        return values.reshape(len(chains), len(wids))

    async def insert_many(self, inserts: Iterable[tuple[str, Sequence[int]]], now: float) -> None:
        """Insert each (worker, chain) at time `now`, in order, in one round trip."""
        await self._run([Insert(wid, tuple(chain), now) for wid, chain in inserts if chain])

    async def match(self, block_hashes: Sequence[int], worker_ids: Sequence[str]) -> np.ndarray:
        """Matched leading blocks of `block_hashes` per worker in `worker_ids` (int64 array)."""
        return (await self.match_many([block_hashes], worker_ids))[0]

    async def insert(self, worker_id: str, block_hashes: Sequence[int], now: float) -> None:
        """Touch or add the chain's blocks for `worker_id` at time `now`, then evict down to capacity."""
        await self._run([Insert(worker_id, tuple(block_hashes), now)])

    async def set_capacity(self, worker_id: str, capacity_blocks: int) -> None:
        """Set `worker_id`'s capacity in blocks, evicting at once if it holds more."""
        await self.set_capacities({worker_id: capacity_blocks})

    async def set_capacities(self, capacities: Mapping[str, int]) -> None:
        """Set each worker's capacity in blocks (evicting at once where it holds more), in one round trip."""
        if any(c < 0 for c in capacities.values()):
            raise ValueError("capacity_blocks must be >= 0")
        await self._run([SetCapacity(wid, c) for wid, c in capacities.items()])

    async def remove_worker(self, worker_id: str) -> None:
        """Forget everything about `worker_id`."""
        await self._run([RemoveWorker(worker_id)])

    async def size(self, worker_id: str) -> int:
        """Number of blocks held for `worker_id`."""
        (n,) = await self._run([Size(worker_id)])
        assert isinstance(n, int)
        return n

    async def clear(self) -> None:
        """Forget everything about every worker (scans this key prefix; meant for tests and resets)."""
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", self._keys.prefix_index("x")[:-1]) + "*"
        batch: list[str | bytes] = []
        async for key in self._r.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await self._r.delete(*batch)
                batch.clear()
        if batch:
            await self._r.delete(*batch)
        await self._r.delete(self._keys.prefix_capacity)

    async def _call(self, ops: Sequence[Op]) -> tuple[np.ndarray, list[int]]:
        """One script call for `ops` (at least one; no Clear among them): the results of every op that has
        some, back to back, and per op how many (-1 none, 0 one count, k a match over k workers)."""
        slots: dict[str, int] = {}

        def slot(worker_id: str) -> int:
            if worker_id not in slots:
                slots[worker_id] = len(slots) + 1
            return slots[worker_id]

        body: list[str | bytes] = []
        widths: list[int] = []  # results per op: -1 none, 0 one count, k a match over k workers
        match_heads: dict[tuple[str, ...], str] = {}  # a batch's matches share their worker list: spelled once
        for op in ops:
            match op:
                case Insert(worker_id, block_hashes, now):
                    body += [f"I,{slot(worker_id)},{float(now)!r}", _members(block_hashes)]
                    widths.append(-1)
                case Match(block_hashes, worker_ids):
                    head = match_heads.get(worker_ids)
                    if head is None:
                        head = f"M,{len(worker_ids)}," + ",".join(str(slot(w)) for w in worker_ids)
                        match_heads[worker_ids] = head
                    body += [head, _members(block_hashes)]
                    widths.append(len(worker_ids))
                case SetCapacity(worker_id, capacity_blocks):
                    body.append(f"C,{slot(worker_id)},{int(capacity_blocks)}")
                    widths.append(-1)
                case RemoveWorker(worker_id):
                    body.append(f"R,{slot(worker_id)}")
                    widths.append(-1)
                case Size(worker_id):
                    body.append(f"S,{slot(worker_id)}")
                    widths.append(0)
                case _:
                    raise TypeError(f"not a batchable prefix index operation: {op!r}")
        ids = list(slots)
        raw = await self._apply_script(
            keys=[self._keys.prefix_capacity, *(self._keys.prefix_index(w) for w in ids)],
            args=[self.capacity_blocks, ",".join(ids), self._keys.prefix_holders, self._keys.prefix_roots, *body],
        )
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return np.fromstring(text, dtype=np.int64, sep=",") if text else np.zeros(0, dtype=np.int64), widths

    async def _run(self, ops: Sequence[Op]) -> list[Observation]:
        """One script call for `ops` (no Clear among them); one observation per op."""
        if not ops:
            return []
        array, widths = await self._call(ops)
        values = array.tolist()
        out: list[Observation] = []
        pos = 0
        for width in widths:
            if width < 0:
                out.append(None)
            elif width == 0:
                out.append(values[pos])
                pos += 1
            else:
                out.append(tuple(values[pos : pos + width]))
                pos += width
        return out
