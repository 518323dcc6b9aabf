"""In-order commits for out-of-order completions."""

from __future__ import annotations

from workers.offsets import OffsetTracker


def test_commit_point_only_passes_contiguous_completions():
    t: OffsetTracker[str] = OffsetTracker()
    for off in (5, 6, 7):
        t.fetched("p0", off)
    assert t.completed("p0", 7) is False
    assert t.committable() == {}
    assert t.completed("p0", 5) is True
    assert t.committable() == {"p0": 6}
    t.committed({"p0": 6})
    assert t.committable() == {}
    assert t.completed("p0", 6) is True
    assert t.committable() == {"p0": 8}
    assert t.pending("p0") == 0


def test_partitions_are_independent():
    t: OffsetTracker[str] = OffsetTracker()
    t.fetched("a", 0)
    t.fetched("b", 10)
    t.fetched("b", 11)
    t.completed("b", 11)
    t.completed("a", 0)
    assert t.committable() == {"a": 1}
    t.completed("b", 10)
    assert t.committable() == {"a": 1, "b": 12}


def test_unknown_and_revoked_partitions_are_ignored():
    t: OffsetTracker[str] = OffsetTracker()
    t.fetched("a", 3)
    t.forget(["a"])
    assert t.completed("a", 3) is False
    assert t.completed("zz", 1) is False
    assert t.committable() == {}


def test_completion_of_an_offset_never_fetched_does_not_advance():
    t: OffsetTracker[str] = OffsetTracker()
    t.fetched("a", 3)
    assert t.completed("a", 2) is False
    assert t.committable() == {}


def test_position_moving_back_restarts_the_partition():
    t: OffsetTracker[str] = OffsetTracker()
    t.fetched("a", 3)
    t.fetched("a", 4)
    t.completed("a", 3)
    assert t.committable() == {"a": 4}
    t.fetched("a", 4)  # refetched after a reset: 4 is still owed
    assert t.committable() == {}
    t.completed("a", 4)
    assert t.committable() == {"a": 5}
