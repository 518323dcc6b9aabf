"""The dispatcher's worker view: staleness, draining, and local assignments until workers report them."""

from __future__ import annotations

from dispatcher.worker_view import WorkerView
from lodestar.schemas import WorkerState


class FakeRegistry:
    def __init__(self, states: list[WorkerState]):
        self.states = states
        self.calls = 0

    async def live_workers(self) -> list[WorkerState]:
        self.calls += 1
        return list(self.states)


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def state(wid: str, **kw: object) -> WorkerState:
    return WorkerState(worker_id=wid, gpu_type="A100", topic=f"t.{wid}", **kw)


async def test_refresh_respects_staleness() -> None:
    reg, clock = FakeRegistry([state("a")]), Clock()
    view = WorkerView(reg, 0.25, clock=clock)  # type: ignore[arg-type]
    assert await view.refresh()
    clock.t += 0.1
    assert not await view.refresh()
    assert await view.refresh(force=True)
    clock.t += 0.3
    assert await view.refresh()
    assert reg.calls == 3


async def test_draining_workers_are_live_but_not_routable() -> None:
    reg = FakeRegistry([state("b", draining=True), state("a", running=3, kv_usage=0.5)])
    view = WorkerView(reg, 0.25)  # type: ignore[arg-type]
    await view.refresh()
    assert [w.worker_id for w in view.live] == ["a", "b"]
    cv = view.cluster_view()
    assert cv.worker_ids == ["a"]
    assert cv.running.tolist() == [3.0] and cv.kv_usage.tolist() == [0.5]
    assert cv.matched_prefix_tokens.tolist() == [0.0]


async def test_local_assignments_count_until_the_worker_reports_after_them() -> None:
    reg = FakeRegistry([state("a", inflight=1, pending_prefill_tokens=10, updated_at=1000.0)])
    view = WorkerView(reg, 0.25, settle_ms=100.0)  # type: ignore[arg-type]
    await view.refresh()
    view.note_assigned("a", 40, routed_at_ms=1050.0)
    view.note_assigned("a", 60, routed_at_ms=1500.0)
    cv = view.cluster_view()
    assert cv.inflight.tolist() == [3.0] and cv.pending_prefill_tokens.tolist() == [110.0]
    # a state written 100 ms after the first assignment includes it; the second is still pending
    reg.states = [state("a", inflight=2, pending_prefill_tokens=50, updated_at=1150.0)]
    await view.refresh(force=True)
    cv = view.cluster_view()
    assert cv.inflight.tolist() == [3.0] and cv.pending_prefill_tokens.tolist() == [110.0]
    reg.states = []
    await view.refresh(force=True)
    assert view.cluster_view().size == 0
    reg.states = [state("a", updated_at=900.0)]
    await view.refresh(force=True)
    assert view.cluster_view().inflight.tolist() == [0.0]  # a vanished worker's pending work is forgotten
