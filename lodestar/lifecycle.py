"""The start/stop sequence every Kafka service shares, as one async context manager.

    async with service_lifecycle(settings, topics, producer=producer, consumers=[consumer],
                                 closers=[redis.aclose]) as scope:
        scope.spawn(heartbeat())      # a background task, stopped first on the way out
        scope.on_stop(deregister)     # runs once the background tasks are stopped, before the clients stop
        await consume()

On entry: the topics exist (`kafka_admin.ensure_topics`), the producer is started, then each consumer
in order. On exit, whether the body returned, raised or was cancelled, in this order: the background
tasks are cancelled and awaited together; the `on_stop` steps run, the last registered first; the
consumers stop, the last started first (commits are manual, so stopping commits nothing: the consumer
leaves its group); the producer stops, which flushes what it still holds; the closers run in the order
given (Redis, the engine client). A start that fails midway stops what it began, the client whose start
failed included (aiokafka allows stopping a half-started client), and still runs the closers. A step
that raises does not skip the ones after it.

Every step of the stop is bounded by `settings.stop_step_timeout_s`: the background tasks together, then
each `on_stop` step, each client's stop and each closer on its own. A background task still running
RECANCEL_S after its cancellation is cancelled again, and again, until it ends or the bound passes: a
cancellation can be lost inside a library (on Python 3.11 `asyncio.wait_for` returns the result instead
of raising when the cancellation arrives as the awaited operation completes, and redis-py sends every
command through it), and a heartbeat loop that lost it would otherwise run, and hold the stop, for ever.
A task or step still running at the bound is abandoned (cancelled, not awaited) with a WARNING naming
it and showing its stack, and the stop goes on with the next step. Abandoning loses no work: offsets are
committed only for records whose outcome the broker acknowledged, so what an abandoned step held is
redelivered; the producer's flush gets the full bound.

Whatever must happen while the background tasks still run (the dispatcher awaiting its last offset
commit) belongs in the body's own `finally`.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from types import FrameType
from typing import Any, Protocol

from lodestar.kafka_admin import ensure_topics
from lodestar.settings import Settings

log = logging.getLogger(__name__)

StopStep = Callable[[], Awaitable[object]]
RECANCEL_S = 1.0  # a cancelled background task still running after this long is cancelled again


class KafkaClient(Protocol):
    """What the lifecycle needs of a producer or consumer (aiokafka's, or a fake in a unit test)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ServiceScope:
    """The running part of a service: its background tasks and its extra stop steps."""

    def __init__(self, stop_step_timeout_s: float) -> None:
        self._tasks: list[asyncio.Task[Any]] = []
        self._steps = AsyncExitStack()
        self._timeout_s = stop_step_timeout_s

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` in the background until the service stops (it is cancelled then)."""
        task = asyncio.create_task(coro, name=getattr(coro, "__qualname__", None))
        self._tasks.append(task)
        return task

    def on_stop(self, step: StopStep) -> None:
        """Run `step` on the way out, after the background tasks stop and before the clients do."""
        self._steps.push_async_callback(bounded_step, step, self._timeout_s)

    def check_background(self) -> None:
        """Raise if a background task has ended: its own error, or RuntimeError if it returned.

        A service calls this in its loop so that it fails loudly instead of running without a helper.
        """
        for task in self._tasks:
            if task.done():
                task.result()
                raise RuntimeError(f"background task {task.get_name()} ended")

    async def _stop(self) -> None:
        await cancel_and_wait(self._tasks, self._timeout_s)
        await self._steps.aclose()


async def cancel_and_wait(tasks: Collection[asyncio.Task[Any]], timeout_s: float) -> None:
    """Cancel `tasks` and wait until they end: one still running RECANCEL_S later is cancelled again (its
    cancellation was lost), until `timeout_s` has passed; then the ones still running are abandoned, each
    named with its stack in a WARNING. Their results and errors are dropped: the service is stopping."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        left = started + timeout_s - loop.time()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(RECANCEL_S, left))
        for task in pending:
            log.warning("stop: background task %s still runs %.1f s after its cancellation (lost on the way?); "
                        "cancelling it again. It is at:\n%s", task.get_name(), loop.time() - started, stack_of(task))
    for task in pending:
        log.warning("stop: abandoned background task %s, still running %.1f s after its cancellation:\n%s",
                    task.get_name(), timeout_s, stack_of(task))
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved, as gather(return_exceptions=True) did: check_background reports errors


async def bounded_step(step: StopStep, timeout_s: float) -> None:
    """Run one stop step; still running after `timeout_s`: abandon it (cancelled, not awaited) with a WARNING
    naming it and showing its stack. An error of the step's own is raised."""
    task = asyncio.ensure_future(step())
    name = step_name(step)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        task.result()
        return
    log.warning("stop: abandoned step %s, still running after %.1f s:\n%s", name, timeout_s, stack_of(task))
    task.cancel()


def step_name(step: StopStep) -> str:
    """A stop step's name for the log: its qualified name (a bound method's, or a partial's function's)."""
    target = getattr(step, "func", step)
    return getattr(target, "__qualname__", None) or repr(target)


def stack_of(task: asyncio.Future[Any]) -> str:
    """Where `task` is now: each coroutine it awaits through, outermost first (asyncio's own print_stack shows
    only the outermost frame of a suspended task)."""
    frames: list[tuple[FrameType, int]] = []
    awaited: Any = task.get_coro() if isinstance(task, asyncio.Task) else None
    while awaited is not None:
        frame = next((getattr(awaited, a) for a in ("cr_frame", "gi_frame", "ag_frame") if getattr(awaited, a, None)),
                     None)
        if frame is not None:
            frames.append((frame, frame.f_lineno))
        awaited = next((getattr(awaited, a) for a in ("cr_await", "gi_yieldfrom", "ag_await")
                        if getattr(awaited, a, None) is not None), None)
    return "".join(traceback.StackSummary.extract(iter(frames)).format()).rstrip() or repr(task)


@asynccontextmanager
async def service_lifecycle(
    settings: Settings,
    topics: Mapping[str, int],
    *,
    producer: KafkaClient,
    consumers: Sequence[KafkaClient] = (),
    closers: Sequence[StopStep] = (),
) -> AsyncIterator[ServiceScope]:
    """Create `topics` (name -> partitions) if missing, start the clients, yield the scope; stop it all."""
    timeout_s = settings.stop_step_timeout_s
    async with AsyncExitStack() as stack:
        for close in reversed(closers):
            stack.push_async_callback(bounded_step, close, timeout_s)
        await ensure_topics(settings, dict(topics))
        stack.push_async_callback(bounded_step, producer.stop, timeout_s)
        await producer.start()
        for consumer in consumers:
            stack.push_async_callback(bounded_step, consumer.stop, timeout_s)
            await consumer.start()
        scope = ServiceScope(timeout_s)
        stack.push_async_callback(scope._stop)
        yield scope
