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

Whatever must happen while the background tasks still run (the dispatcher awaiting its last offset
commit) belongs in the body's own `finally`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, Protocol

from lodestar.kafka_admin import ensure_topics
from lodestar.settings import Settings

StopStep = Callable[[], Awaitable[object]]


class KafkaClient(Protocol):
    """What the lifecycle needs of a producer or consumer (aiokafka's, or a fake in a unit test)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ServiceScope:
    """The running part of a service: its background tasks and its extra stop steps."""

    def __init__(self) -> None:
        self._tasks: list[asyncio.Task[Any]] = []
        self._steps = AsyncExitStack()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run `coro` in the background until the service stops (it is cancelled then)."""
        task = asyncio.create_task(coro, name=getattr(coro, "__qualname__", None))
        self._tasks.append(task)
        return task

    def on_stop(self, step: StopStep) -> None:
        """Run `step` on the way out, after the background tasks stop and before the clients do."""
        self._steps.push_async_callback(step)

    def check_background(self) -> None:
        """Raise if a background task has ended: its own error, or RuntimeError if it returned.

        A service calls this in its loop so that it fails loudly instead of running without a helper.
        """
        for task in self._tasks:
            if task.done():
                task.result()
                raise RuntimeError(f"background task {task.get_name()} ended")

    async def _stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._steps.aclose()


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
    async with AsyncExitStack() as stack:
        for close in reversed(closers):
            stack.push_async_callback(close)
        await ensure_topics(settings, dict(topics))
        stack.push_async_callback(producer.stop)
        await producer.start()
        for consumer in consumers:
            stack.push_async_callback(consumer.stop)
            await consumer.start()
        scope = ServiceScope()
        stack.push_async_callback(scope._stop)
        yield scope
