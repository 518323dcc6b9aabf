"""The services' shared start/stop sequence (lodestar/lifecycle.py): order on the way in and out, and
cleanup when a start fails midway, with in-memory clients that record what happens to them."""

from __future__ import annotations

import asyncio

import pytest

from lodestar import lifecycle
from lodestar.lifecycle import service_lifecycle
from lodestar.settings import Settings

TOPICS = {"t.requests": 3}


class Recorder:
    def __init__(self, monkeypatch: pytest.MonkeyPatch, *, topics_fail: bool = False):
        self.events: list[str] = []

        async def ensure_topics(settings: Settings, topics: dict[str, int]) -> dict[str, str]:
            self.events.append(f"topics {sorted(topics)}")
            if topics_fail:
                raise ConnectionError("no broker")
            return dict.fromkeys(topics, "created")

        monkeypatch.setattr(lifecycle, "ensure_topics", ensure_topics)

    def client(self, name: str, *, start_fails: bool = False, stop_fails: bool = False) -> FakeClient:
        return FakeClient(self.events, name, start_fails=start_fails, stop_fails=stop_fails)

    def step(self, name: str):
        async def run() -> None:
            self.events.append(name)
        return run


class FakeClient:
    def __init__(self, events: list[str], name: str, *, start_fails: bool, stop_fails: bool):
        self.events, self.name, self.start_fails, self.stop_fails = events, name, start_fails, stop_fails

    async def start(self) -> None:
        self.events.append(f"start {self.name}")
        if self.start_fails:
            raise ConnectionError(f"{self.name} cannot connect")

    async def stop(self) -> None:
        self.events.append(f"stop {self.name}")
        if self.stop_fails:
            raise RuntimeError(f"{self.name} failed to stop")


TEARDOWN = ["stop c2", "stop c1", "stop producer", "close redis", "close engine"]


def _running(rec: Recorder, **clients: FakeClient):
    return service_lifecycle(
        Settings(), TOPICS,
        producer=clients.get("producer") or rec.client("producer"),
        consumers=[clients.get("c1") or rec.client("c1"), clients.get("c2") or rec.client("c2")],
        closers=[rec.step("close redis"), rec.step("close engine")],
    )


async def _heartbeat(events: list[str]) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        events.append("heartbeat cancelled")
        raise


async def test_starts_in_order_and_stops_in_reverse(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    async with _running(rec) as scope:
        rec.events.append("body")
        scope.on_stop(rec.step("deregister"))
        scope.on_stop(rec.step("abandon"))
        scope.spawn(_heartbeat(rec.events))
        await asyncio.sleep(0)  # let the heartbeat start waiting
    assert rec.events == [
        "topics ['t.requests']", "start producer", "start c1", "start c2", "body",
        "heartbeat cancelled", "abandon", "deregister", *TEARDOWN,
    ]


async def test_a_failing_body_still_stops_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    with pytest.raises(ValueError, match="bug"):
        async with _running(rec) as scope:
            scope.on_stop(rec.step("deregister"))
            raise ValueError("bug")
    assert rec.events[-6:] == ["deregister", *TEARDOWN]


async def test_a_cancelled_service_still_stops_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    entered = asyncio.Event()

    async def serve() -> None:
        async with _running(rec) as scope:
            scope.spawn(_heartbeat(rec.events))
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(serve())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.events[-6:] == ["heartbeat cancelled", *TEARDOWN]


async def test_a_consumer_failing_to_start_stops_what_was_started(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    with pytest.raises(ConnectionError, match="c2 cannot connect"):
        async with _running(rec, c2=rec.client("c2", start_fails=True)):
            rec.events.append("body")
    assert "body" not in rec.events
    assert rec.events == ["topics ['t.requests']", "start producer", "start c1", "start c2", *TEARDOWN]


async def test_the_producer_failing_to_start_stops_it_and_runs_the_closers(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    with pytest.raises(ConnectionError, match="producer cannot connect"):
        async with _running(rec, producer=rec.client("producer", start_fails=True)):
            rec.events.append("body")
    assert rec.events == ["topics ['t.requests']", "start producer", "stop producer", "close redis", "close engine"]


async def test_topics_failing_starts_no_client_but_runs_the_closers(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch, topics_fail=True)
    with pytest.raises(ConnectionError, match="no broker"):
        async with _running(rec):
            rec.events.append("body")
    assert rec.events == ["topics ['t.requests']", "close redis", "close engine"]


async def test_a_failing_stop_step_skips_none_of_the_later_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)
    with pytest.raises(RuntimeError, match="c1 failed to stop"):
        async with _running(rec, c1=rec.client("c1", stop_fails=True)):
            pass
    assert rec.events[-5:] == TEARDOWN


async def test_check_background_reports_a_helper_that_ended(monkeypatch: pytest.MonkeyPatch) -> None:
    rec = Recorder(monkeypatch)

    async def crashes() -> None:
        raise OSError("redis gone")

    async def returns() -> None:
        return None

    async with _running(rec) as scope:
        scope.spawn(_heartbeat(rec.events))
        await asyncio.sleep(0)
        scope.check_background()  # all running: nothing to report
        crashed = scope.spawn(crashes())
        await asyncio.gather(crashed, return_exceptions=True)
        with pytest.raises(OSError, match="redis gone"):
            scope.check_background()
    async with _running(rec) as scope:
        scope.spawn(returns())
        await asyncio.sleep(0)
        with pytest.raises(RuntimeError, match=r"background task .*returns ended"):
            scope.check_background()
