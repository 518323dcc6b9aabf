"""Failure-aware workers on fakes: the circuit breaker's states, the retry budget and jitter, the total deadline of
a generation, and what a worker does when its engine is declared dead (stops advertising itself, abandons its
in-flight requests with their leases released, leaves its group) and when the probe finds it alive again."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest
from worker_fakes import FakeLedger, FakeProducer, by_prompt, engine, routed_record

from lodestar.schemas import InferenceRequest, SamplingParams, now_ms
from lodestar.settings import Settings
from workers.breaker import BreakerState, CircuitBreaker, EngineGuard, counts_against_engine, supervise
from workers.retry import RetryBudget, RetryPolicy
from workers.service import WorkerService
from workers.sglang_client import EngineError, EngineRejected, EngineUnauthorized, EngineUnavailable

RESULTS = "lodestar.results"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ask(prompt: str = "hello", **kw: Any) -> InferenceRequest:
    return InferenceRequest(request_id=kw.pop("request_id", "r1"), prompt=prompt,
                            sampling=SamplingParams(max_new_tokens=3), **kw)


# ---- the breaker ---------------------------------------------------------------------------------------------

def test_consecutive_failures_open_the_breaker_and_a_success_resets_the_run() -> None:
    clock = Clock()
    breaker = CircuitBreaker(3, cooldown_s=5.0, clock=clock)
    breaker.record_failure("a")
    breaker.record_failure("b")
    breaker.record_success()  # the run is broken: two more do not open it
    breaker.record_failure("c")
    breaker.record_failure("d")
    assert breaker.routable and breaker.closed.is_set() and not breaker.opened.is_set()
    breaker.record_failure("e")
    assert breaker.state is BreakerState.OPEN and not breaker.routable
    assert breaker.opened.is_set() and not breaker.closed.is_set()
    assert "3 consecutive engine failures" in breaker.reason and breaker.reason.endswith("e")


def test_half_open_probe_after_the_cooldown_closes_or_reopens() -> None:
    clock = Clock()
    entered: list[BreakerState] = []
    breaker = CircuitBreaker(1, cooldown_s=5.0, clock=clock, on_change=entered.append)
    breaker.trip("silent")
    assert breaker.cooldown_left() == pytest.approx(5.0)
    clock.now += 2.0
    breaker.begin_probe()  # too early: still open
    assert breaker.state is BreakerState.OPEN and breaker.cooldown_left() == pytest.approx(3.0)
    clock.now += 3.0
    breaker.begin_probe()
    assert breaker.state is BreakerState.HALF_OPEN and not breaker.routable
    breaker.record_failure("still 500")  # a failed probe: open for another cooldown
    assert breaker.state is BreakerState.OPEN and breaker.cooldown_left() == pytest.approx(5.0)
    assert breaker.times_opened == 2
    clock.now += 5.0
    breaker.begin_probe()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.routable and breaker.closed.is_set()
    S = BreakerState
    assert entered == [S.OPEN, S.HALF_OPEN, S.OPEN, S.HALF_OPEN, S.CLOSED]  # every state entered, once each time


def test_only_the_engines_own_failures_count() -> None:
    assert counts_against_engine(EngineUnavailable("503", 503))
    assert counts_against_engine(EngineError("HTTP 500", 500))
    assert counts_against_engine(EngineError("timed out"))
    assert counts_against_engine(EngineUnavailable("429", 429))
    assert not counts_against_engine(EngineRejected("prompt too long", 400))
    assert not counts_against_engine(EngineUnauthorized("bad key", 401))
    assert not counts_against_engine(EngineError("aborted: the client went away", 499))


# ---- retries -------------------------------------------------------------------------------------------------

def test_retry_delays_are_jittered_exponential_and_capped() -> None:
    policy = RetryPolicy(6, 0.1, max_backoff_s=0.5, jitter=0.5, rng=random.Random(7))
    delays = list(policy.delays())
    ceilings = [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert len(delays) == 6
    assert all(c * 0.5 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    assert len({round(d, 6) for d in delays[3:]}) == 3  # the capped ones are not in step


def test_the_retry_budget_limits_retries_to_a_share_of_calls() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, window_s=10.0, min_retries=2, clock=clock)
    policy = RetryPolicy(5, 0.01, budget=budget)
    retries = sum(len(list(policy.delays())) for _ in range(10))  # an engine failing every call
    assert retries == 2 + 2  # min_retries + 20 % of 10 calls, not 10 x 5
    clock.now += 11.0  # the window has passed: the budget is back
    assert len(list(policy.delays())) == 3  # a retry is taken while fewer than 2 + 0.2 x 1 were


# ---- the guard -----------------------------------------------------------------------------------------------

async def test_a_generation_longer_than_its_total_deadline_is_cut_and_counts() -> None:
    breaker = CircuitBreaker(2, cooldown_s=5.0)
    guard = EngineGuard(breaker, generation_timeout_s=0.05)
    with pytest.raises(EngineError, match="generation_timeout_s"):
        await guard.run(ask(), lambda: asyncio.sleep(10))
    assert breaker.failures == 1


async def test_a_request_cut_by_its_own_deadline_does_not_count_against_the_engine() -> None:
    breaker = CircuitBreaker(1, cooldown_s=5.0)
    guard = EngineGuard(breaker, generation_timeout_s=60.0)
    with pytest.raises(EngineError, match="deadline exceeded during generation"):
        await guard.run(ask(deadline_ms=now_ms() + 50), lambda: asyncio.sleep(10))
    assert breaker.routable and breaker.failures == 0


async def test_a_refused_input_does_not_count_and_a_success_resets() -> None:
    breaker = CircuitBreaker(2, cooldown_s=5.0)
    guard = EngineGuard(breaker, generation_timeout_s=60.0)

    async def refused() -> None:
        raise EngineRejected("bad input", 400)

    async def failing() -> None:
        raise EngineUnavailable("503", 503)

    async def fine() -> str:
        return "ok"

    with pytest.raises(EngineUnavailable):
        await guard.run(ask(), failing)
    with pytest.raises(EngineRejected):
        await guard.run(ask(), refused)
    assert breaker.failures == 1
    assert await guard.run(ask(), fine) == "ok"
    assert breaker.failures == 0


async def test_supervise_declares_dead_probes_after_each_cooldown_and_revives() -> None:
    breaker = CircuitBreaker(1, cooldown_s=0.01)
    events: list[str] = []
    probes = iter([EngineUnavailable("still down", 503), None])

    async def probe() -> None:
        events.append("probe")
        outcome = next(probes)
        if outcome is not None:
            raise outcome

    async def on_dead() -> None:
        events.append("dead")

    alive = asyncio.Event()

    async def on_alive() -> None:
        events.append("alive")
        alive.set()

    task = asyncio.create_task(supervise(breaker, probe=probe, probe_timeout_s=1.0, on_dead=on_dead,
                                         on_alive=on_alive))
    breaker.record_failure("HTTP 500")
    await asyncio.wait_for(alive.wait(), 5)
    task.cancel()
    assert events == ["dead", "probe", "probe", "alive"]
    assert breaker.routable and breaker.times_opened == 2


# ---- the worker ----------------------------------------------------------------------------------------------

class FakeRegistry:
    def __init__(self) -> None:
        self.published: list[Any] = []
        self.deregistered = 0

    async def publish(self, state: Any) -> None:
        self.published.append(state)

    async def deregister(self, worker_id: str) -> None:
        self.deregistered += 1


class FakeConsumer:
    def __init__(self) -> None:
        self.subscribed = True
        self.commits: list[Any] = []

    def assignment(self) -> set[Any]:
        return set()

    def unsubscribe(self) -> None:
        self.subscribed = False

    def subscribe(self, topics: list[str], listener: Any = None) -> None:
        self.subscribed = True

    async def commit(self, offsets: Any) -> None:
        self.commits.append(offsets)


class ReleasingLedger(FakeLedger):
    def __init__(self) -> None:
        super().__init__()
        self.released: list[str] = []

    async def release(self, request_id: str) -> None:
        self.released.append(request_id)


def failing_engine(status: int, calls: list[dict[str, Any]]):
    return engine(lambda prompt: httpx.Response(status, text="engine failure") if prompt != "ping"
                  else by_prompt("hello"), calls)


@pytest.fixture
def worker() -> WorkerService:
    settings = Settings(worker={"worker_id": "w1", "sglang_url": "http://engine", "retry_backoff_s": 0.001,
                                "breaker_failures": 3})
    calls: list[dict[str, Any]] = []
    service = WorkerService(settings, engine=failing_engine(500, calls))
    service.ledger = ReleasingLedger()  # type: ignore[assignment]
    service._producer = FakeProducer()  # type: ignore[assignment]
    service._consumer = FakeConsumer()  # type: ignore[assignment]
    service.registry = FakeRegistry()  # type: ignore[assignment]
    return service


async def test_an_engine_answering_500_opens_the_breaker_and_the_worker_leaves(worker: WorkerService) -> None:
    for n in range(3):
        await asyncio.wait_for(worker._run_record(routed_record(ask(request_id=f"r{n}"), offset=n)), 10)
    results = worker._producer.to(RESULTS)  # type: ignore[union-attr]
    assert [r["status"] for r in results] == ["error"] * 3  # each answered, none lost
    assert all("HTTP 500" in r["error"] for r in results)
    assert worker.breaker.state is BreakerState.OPEN
    sample = worker.metrics.registry.get_sample_value
    assert sample("lodestar_worker_breaker_open", {"worker": worker.worker_id}) == 1
    assert sample("lodestar_worker_breaker_opened_total", {"worker": worker.worker_id}) == 1

    # a request that reached the worker meanwhile waits for the breaker, holding its lease ...
    held = asyncio.create_task(worker._run_record(routed_record(ask(request_id="held"), offset=3)))
    worker._tasks.add(held)
    held.add_done_callback(worker._task_done)
    await asyncio.sleep(0.05)
    assert not held.done() and "held" in worker._claimed
    # ... until the engine is declared dead: it is abandoned (lease released, record not completed)
    await worker._engine_dead()
    assert held.cancelled() and worker.ledger.released == ["held"]  # type: ignore[attr-defined]
    assert worker.registry.deregistered == 1  # type: ignore[attr-defined]
    assert not worker._consumer.subscribed  # type: ignore[union-attr]
    assert not worker.health.ready
    assert [r["request_id"] for r in worker._producer.to(RESULTS)] == ["r0", "r1", "r2"]  # type: ignore[union-attr]

    # the half-open probe ("ping" is answered) closes the breaker; the worker rejoins and advertises again
    worker.engine.load = _load_ok  # type: ignore[method-assign]
    await worker._probe()
    worker.breaker.record_success()
    await worker._engine_alive()
    assert worker._consumer.subscribed and worker.registry.published  # type: ignore[union-attr,attr-defined]
    assert sample("lodestar_worker_breaker_open", {"worker": worker.worker_id}) == 0


async def _load_ok() -> Any:
    from workers.sglang_client import EngineLoad
    return EngineLoad(running=0, waiting=0, kv_usage=0.0, max_kv_tokens=1000, source="/v1/loads")
