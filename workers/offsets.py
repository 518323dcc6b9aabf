"""In-order offset commits for out-of-order completions.

Requests of one partition finish in any order, but a Kafka commit says "everything before this offset
is done". So a partition's commit point advances only past a contiguous run of completed records:
with offsets 5, 6, 7 fetched and 5 and 7 completed, the committable offset is 6 (the next to read),
and it jumps to 8 once 6 completes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

P = TypeVar("P", bound=Hashable)


class _PartitionOffsets:
    __slots__ = ("fetched", "completed", "next_offset", "committed")

    def __init__(self) -> None:
        self.fetched: deque[int] = deque()
        self.completed: set[int] = set()
        self.next_offset: int | None = None
        self.committed: int | None = None


class OffsetTracker(Generic[P]):
    """Per partition: which fetched offsets are complete, and how far a commit may go."""

    def __init__(self) -> None:
        self._parts: dict[P, _PartitionOffsets] = {}

    def fetched(self, partition: P, offset: int) -> None:
        """A record was handed to processing.

        Offsets of a partition arrive in increasing order; one that does not means the consumer's
        position moved back (a reset), so the partition's bookkeeping starts over from it.
        """
        part = self._parts.setdefault(partition, _PartitionOffsets())
        if part.fetched and offset <= part.fetched[-1] or part.next_offset is not None and offset < part.next_offset:
            part = self._parts[partition] = _PartitionOffsets()
        part.fetched.append(offset)

    def completed(self, partition: P, offset: int) -> bool:
        """A record's work is done and acknowledged; returns whether the commit point advanced."""
        part = self._parts.get(partition)
        if part is None or offset not in part.fetched:
            return False  # the partition was revoked meanwhile, or the offset is not ours
        part.completed.add(offset)
        advanced = False
        while part.fetched and part.fetched[0] in part.completed:
            done = part.fetched.popleft()
            part.completed.discard(done)
            part.next_offset = done + 1
            advanced = True
        return advanced

    def committable(self) -> dict[P, int]:
        """Partitions whose commit point moved since the last `committed`, with the offset to commit."""
        return {
            p: part.next_offset
            for p, part in self._parts.items()
            if part.next_offset is not None and part.next_offset != part.committed
        }

    def committed(self, offsets: dict[P, int]) -> None:
        """Record that these offsets were committed."""
        for p, offset in offsets.items():
            part = self._parts.get(p)
            if part is not None:
                part.committed = offset

    def pending(self, partition: P) -> int:
        """Fetched records of a partition not yet covered by the commit point."""
        part = self._parts.get(partition)
        return len(part.fetched) if part else 0

    def forget(self, partitions: Iterable[P]) -> None:
        """Drop partitions this consumer no longer owns (after a rebalance revoked them)."""
        for p in partitions:
            self._parts.pop(p, None)
