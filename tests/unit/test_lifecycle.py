"""The services' shared start/stop sequence (lodestar/lifecycle.py): order on the way in and out, cleanup
when a start fails midway, and a stop that completes when a task loses its cancellation or a step hangs,
with in-memory clients that record what happens to them."""

from __future__ import annotations

import asyncio
import logging
import sys

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

    def client(self, name: str, *, start_fails: bool = False, stop_fails: bool = False,
               stop_hangs: bool = False) -> FakeClient:
        return FakeClient(self.events, name, start_fails=start_fails, stop_fails=stop_fails, stop_hangs=stop_hangs)

    def step(self, name: str):
        async def run() -> None:
            self.events.append(name)
        return run


class FakeClient:
    def __init__(self, events: list[str], name: str, *, start_fails: bool, stop_fails: bool, stop_hangs: bool):
        self.events, self.name, self.start_fails, self.stop_fails = events, name, start_fails, stop_fails
        self.stop_hangs = stop_hangs

    async def start(self) -> None:
        self.events.append(f"start {self.name}")
        if self.start_fails:
            raise ConnectionError(f"{self.name} cannot connect")

    async def stop(self) -> None:
        self.events.append(f"stop {self.name}")
        if self.stop_fails:
            raise RuntimeError(f"{self.name} failed to stop")
        if self.stop_hangs:  # e.g. a flush to a broker that does not answer
            await asyncio.Event().wait()


TEARDOWN = ["stop c2", "stop c1", "stop producer", "close redis", "close engine"]


def _running(rec: Recorder, settings: Settings | None = None, **clients: FakeClient):
    return service_lifecycle(
        settings or Settings(), TOPICS,
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


STEP_TIMEOUT_S = 0.3  # a stuck step is abandoned this fast in these tests (the default is 10 s)


@pytest.fixture
def quick_stop(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> Settings:
    """Settings whose stop steps are abandoned after STEP_TIMEOUT_S, a lost cancellation repeated after 50 ms."""
    monkeypatch.setattr(lifecycle, "RECANCEL_S", 0.05)
    caplog.set_level(logging.WARNING, logger="lodestar.lifecycle")
    return Settings(stop_step_timeout_s=STEP_TIMEOUT_S)


async def test_a_cancellation_lost_in_wait_for_is_repeated_and_the_stop_completes(
        monkeypatch: pytest.MonkeyPatch, quick_stop: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """What held the worker's stop: on Python 3.11 `asyncio.wait_for` returns the result when the cancellation
    arrives as the awaited operation completes (redis-py sends each command through it), so a heartbeat loop
    that was mid-call when the stop cancelled it runs on."""
    rec = Recorder(monkeypatch)
    reply: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    calls: list[int] = []

    async def heartbeat_loop() -> None:
        try:
            while True:
                calls.append(len(calls))
                await asyncio.wait_for(reply if len(calls) == 1 else asyncio.Event().wait(), 5)
        finally:
            rec.events.append("heartbeat ended")

    async with asyncio.timeout(5):
        async with _running(rec, quick_stop) as scope:
            task = scope.spawn(heartbeat_loop())
            await asyncio.sleep(0)  # the loop awaits its first "command"
            reply.set_result(None)  # its reply arrives in the same step as the stop's cancellation
    assert task.done() and rec.events[-6:] == ["heartbeat ended", *TEARDOWN]
    if sys.version_info < (3, 12):  # the lost cancellation (3.12's wait_for no longer loses it)
        assert len(calls) == 2 and "heartbeat_loop still runs" in caplog.text and "cancelling it again" in caplog.text


async def test_a_task_that_ignores_cancellation_is_named_and_the_stop_completes(
        monkeypatch: pytest.MonkeyPatch, quick_stop: Settings, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(monkeypatch)
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                rec.events.append("stubborn ignored a cancellation")

    async with asyncio.timeout(5):
        async with _running(rec, quick_stop) as scope:
            scope.on_stop(rec.step("deregister"))
            task = scope.spawn(stubborn())
            scope.spawn(_heartbeat(rec.events))
            await asyncio.sleep(0)
    assert not task.done()  # abandoned, still running
    assert rec.events.count("stubborn ignored a cancellation") >= 2  # cancelled again and again
    assert "heartbeat cancelled" in rec.events and rec.events[-6:] == ["deregister", *TEARDOWN]
    abandoned = [r for r in caplog.records if "abandoned background task" in r.getMessage()]
    assert len(abandoned) == 1 and abandoned[0].levelno == logging.WARNING
    message = abandoned[0].getMessage()
    assert "stubborn" in message and "test_lifecycle.py" in message and "await asyncio.sleep(10)" in message
    release.set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def test_a_stuck_stop_step_is_abandoned_and_the_later_steps_run(
        monkeypatch: pytest.MonkeyPatch, quick_stop: Settings, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(monkeypatch)

    async def leave_group() -> None:
        rec.events.append("leave group")
        await asyncio.Event().wait()  # e.g. a coordinator that never answers

    async with asyncio.timeout(5):
        async with _running(rec, quick_stop) as scope:
            scope.on_stop(rec.step("deregister"))
            scope.on_stop(leave_group)
    assert rec.events[-7:] == ["leave group", "deregister", *TEARDOWN]
    (warning,) = [r.getMessage() for r in caplog.records if "abandoned step" in r.getMessage()]
    assert "leave_group" in warning and f"after {STEP_TIMEOUT_S:.1f} s" in warning and "Event().wait()" in warning


async def test_a_producer_flush_that_hangs_is_abandoned_and_the_closers_still_run(
        monkeypatch: pytest.MonkeyPatch, quick_stop: Settings, caplog: pytest.LogCaptureFixture) -> None:
    rec = Recorder(monkeypatch)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        async with _running(rec, quick_stop, producer=rec.client("producer", stop_hangs=True)):
            pass
    assert rec.events[-5:] == TEARDOWN
    assert loop.time() - started >= STEP_TIMEOUT_S  # the flush had its full bound
    (warning,) = [r.getMessage() for r in caplog.records if "abandoned step" in r.getMessage()]
    assert "FakeClient.stop" in warning and "in stop" in warning and "Event().wait()" in warning
