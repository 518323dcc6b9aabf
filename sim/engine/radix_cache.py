"""Block-granular radix prefix cache with reference counts and LRU eviction, as in SGLang's RadixCache.

Keys are chained block hashes (lodestar.hashing): block i's hash identifies blocks 0..i. Nodes are runs
of blocks (a compressed radix tree, split where prefixes diverge or where a request's match ends), each
block holding `block_tokens` tokens of KV; a node's children are keyed by their first block's hash. A
match walks down from the root, one dict lookup per node on the path; inside a node the chain's prefix
property (equal hashes at position j mean equal blocks 0..j) lets it bisect for where a run stops
matching. No structure grows with the number of cached blocks other than the runs themselves, so a
block of one token (SGLang's default page size) costs no per-token bookkeeping.

Granularity: the unit is a whole block. A prompt's trailing partial block is never cached (it stays
private to its request and is freed when it finishes), so with blocks of more than one token a match can
be up to block_tokens - 1 tokens shorter than SGLang's at page size 1.

Eviction: only unreferenced (lock_ref == 0) leaves are evictable, least recently used first, a whole
node at a time (as SGLang's `evict`). Recency order is kept in one ordered dict of unlocked nodes in
which every node is older than its parent (accesses touch a path leaf-first), so the oldest entry is
always an evictable leaf.
"""

from __future__ import annotations

from collections import OrderedDict

ROOT = 0


class BlockRadixCache:
    """Prefix cache over chained block hashes; node ids are ints, state lives in flat dicts."""

    __slots__ = ("_seg", "_bt", "_parent", "_children", "_lock", "_lru", "_next_id", "total_tokens",
                 "evictable_tokens")

    def __init__(self) -> None:
        self._seg: dict[int, tuple[int, ...]] = {ROOT: ()}
        self._bt: dict[int, int] = {ROOT: 0}  # tokens per block of the node
        self._parent: dict[int, int] = {}
        self._children: dict[int, dict[int, int]] = {ROOT: {}}  # first hash -> child
        self._lock: dict[int, int] = {ROOT: 1}  # the root is never evicted
        self._lru: OrderedDict[int, None] = OrderedDict()  # unlocked nodes, oldest first
        self._next_id = 1
        self.total_tokens = 0
        self.evictable_tokens = 0

    # ---- queries -------------------------------------------------------------------------------
    @property
    def protected_tokens(self) -> int:
        """Tokens in nodes some request references."""
        return self.total_tokens - self.evictable_tokens

    def __len__(self) -> int:
        return len(self._seg) - 1

    def node_tokens(self, node: int) -> int:
        return len(self._seg[node]) * self._bt[node]

    def _walk(self, hashes: tuple[int, ...] | list[int], limit: int | None) -> tuple[int, int, int]:
        """(k, node, used): the longest cached prefix of `hashes` (at most `limit` blocks) is k blocks long
        and ends in `node` after its first `used` blocks; (0, ROOT, 0) when nothing matches."""
        n = len(hashes) if limit is None else min(limit, len(hashes))
        children = self._children
        segs = self._seg
        node, k, used = ROOT, 0, 0
        while k < n:
            child = children[node].get(hashes[k])
            if child is None:
                break
            seg = segs[child]
            m = min(len(seg), n - k)
            if seg[m - 1] == hashes[k + m - 1]:
                j = m
            else:  # seg[0] matches, seg[m - 1] does not: bisect for the first block that differs
                lo, hi = 1, m - 1
                while lo < hi:
                    mid = (lo + hi) // 2
                    if seg[mid] == hashes[k + mid]:
                        lo = mid + 1
                    else:
                        hi = mid
                j = lo
            node, used, k = child, j, k + j
            if j < len(seg):
                break
        return k, node, used

    def cached_blocks(self, hashes: tuple[int, ...] | list[int], limit: int | None = None) -> int:
        """Length in blocks of the longest cached prefix of `hashes` (at most `limit`); no side effects."""
        return self._walk(hashes, limit)[0]

    # ---- matching and insertion ----------------------------------------------------------------
    def match_prefix(self, hashes: tuple[int, ...] | list[int], limit: int | None = None) -> tuple[int, int]:
        """(matched blocks, node ending exactly there); splits a node if needed and marks the path used."""
        k, node, used = self._walk(hashes, limit)
        if k == 0:
            return 0, ROOT
        node = self._ending(node, used)
        self._touch(node)
        return k, node

    def insert(self, hashes: tuple[int, ...] | list[int], block_tokens: int) -> int:
        """Add the chain `hashes` (whole blocks of `block_tokens` tokens); returns the node of its last block."""
        if not hashes:
            return ROOT
        k, parent, used = self._walk(hashes, None)
        if k:
            parent = self._ending(parent, used)
        if k == len(hashes):
            self._touch(parent)
            return parent
        node = self._next_id
        self._next_id += 1
        seg = tuple(hashes[k:])
        self._seg[node] = seg
        self._bt[node] = block_tokens
        self._parent[node] = parent
        self._children[node] = {}
        self._children[parent][seg[0]] = node
        self._lock[node] = 0
        tokens = len(seg) * block_tokens
        self.total_tokens += tokens
        self.evictable_tokens += tokens
        self._lru[node] = None
        self._touch(node)
        return node

    def _ending(self, node: int, used: int) -> int:
        """The node whose last block is `node`'s block `used - 1`, splitting `node` there if needed."""
        return self._split(node, used) if used < len(self._seg[node]) else node

    def _split(self, node: int, at: int) -> int:
        """Move the first `at` blocks of `node` into a new parent node and return it. `node` keeps the
        rest, so requests referencing `node` still reference the whole path through the new node."""
        seg = self._seg[node]
        head = self._next_id
        self._next_id += 1
        parent = self._parent[node]
        self._seg[head] = seg[:at]
        self._seg[node] = seg[at:]
        self._bt[head] = self._bt[node]
        self._parent[head] = parent
        self._parent[node] = head
        self._children[parent][seg[0]] = head
        self._children[head] = {seg[at]: node}
        self._lock[head] = self._lock[node]
        if self._lock[node] == 0:
            self._lru[head] = None  # newer than its child; callers touch the path right after
        return head

    def _touch(self, node: int) -> None:
        """Mark the path root..node most recently used (leaf first, so parents stay newer)."""
        lru = self._lru
        parent = self._parent
        while node != ROOT:
            if node in lru:
                lru.move_to_end(node)
            node = parent[node]

    # ---- references ----------------------------------------------------------------------------
    def lock(self, node: int) -> None:
        """Reference the path root..node: its blocks become unevictable."""
        lock = self._lock
        parent = self._parent
        while node != ROOT:
            if lock[node] == 0:
                del self._lru[node]
                self.evictable_tokens -= len(self._seg[node]) * self._bt[node]
            lock[node] += 1
            node = parent[node]

    def unlock(self, node: int) -> None:
        """Drop one reference to the path root..node; unreferenced nodes become most recently used."""
        lock = self._lock
        parent = self._parent
        while node != ROOT:
            lock[node] -= 1
            if lock[node] == 0:
                self._lru[node] = None
                self.evictable_tokens += len(self._seg[node]) * self._bt[node]
            elif lock[node] < 0:
                raise RuntimeError(f"radix cache node {node} unlocked more often than locked")
            node = parent[node]

    # ---- eviction ------------------------------------------------------------------------------
    def evict(self, tokens: int) -> int:
        """Evict least recently used unreferenced leaves until `tokens` are freed; returns tokens freed."""
        freed = 0
        lru = self._lru
        while freed < tokens and lru:
            node, _ = lru.popitem(last=False)
            if self._children[node]:
                raise RuntimeError("radix cache recency order broken: oldest unlocked node is not a leaf")
            freed += self._remove_leaf(node)
        self.evictable_tokens -= freed
        self.total_tokens -= freed
        return freed

    def _remove_leaf(self, node: int) -> int:
        seg = self._seg.pop(node)
        bt = self._bt.pop(node)
        parent = self._parent.pop(node)
        del self._children[parent][seg[0]]
        del self._children[node]
        del self._lock[node]
        return len(seg) * bt

    def reset(self) -> None:
        """Drop everything (SGLang's flush_cache); callers ensure nothing is referenced."""
        if self.protected_tokens:
            raise RuntimeError("cannot flush a radix cache with referenced blocks")
        self.__init__()  # type: ignore[misc]

    def clone(self) -> BlockRadixCache:
        """An independent copy (flat dict copies; the per-node children dicts are copied too)."""
        c = BlockRadixCache.__new__(BlockRadixCache)
        c._seg = self._seg.copy()
        c._bt = self._bt.copy()
        c._parent = self._parent.copy()
        c._children = {k: v.copy() for k, v in self._children.items()}
        c._lock = self._lock.copy()
        c._lru = self._lru.copy()
        c._next_id = self._next_id
        c.total_tokens = self.total_tokens
        c.evictable_tokens = self.evictable_tokens
        return c
