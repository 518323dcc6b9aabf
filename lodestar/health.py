"""Liveness and readiness of a service, for its supervisor (Kubernetes probes), served beside `/metrics`.

- `/healthz` (liveness): 200 while the service's event loop runs a callback scheduled from the HTTP thread
  within `LIVENESS_TIMEOUT_S`; 503 when the loop is blocked, stopped or closed. A loop stuck in a
  synchronous call fails it, which is what a restart can cure.
- `/readyz` (readiness): 200 once every condition the service declared holds, else 503; the body is JSON
  with each condition's state and a one-line detail either way.

Each service declares its conditions when it builds its `Health` and marks them as it starts: the
dispatcher `group` (it joined its consumer group: partitions or idle in the group) and `model` (snapshot
loaded, fallback declared, or a policy without a model); the worker `engine` (its engine answers) and
`group` (joined; not ready again once draining); the learner `group`. docs/observability.md lists them.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from aiokafka import TopicPartition
from aiokafka.abc import ConsumerRebalanceListener

LIVENESS_TIMEOUT_S = 2.0
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"


@dataclass(frozen=True, slots=True)
class Condition:
    """One readiness condition: whether it holds and why (a short line for an operator)."""

    ready: bool
    detail: str


class Health:
    """A service's readiness conditions and the event loop whose liveness is probed.

    Set from the service's event loop, read from the HTTP server's threads: every access takes the lock.
    """

    def __init__(self, *conditions: str):
        if not conditions:
            raise ValueError("a service declares at least one readiness condition")
        self._lock = threading.Lock()
        self._conditions = {name: Condition(False, "not yet") for name in conditions}
        self._loop: asyncio.AbstractEventLoop | None = None

    def set(self, condition: str, ready: bool, detail: str) -> None:
        """Record the state of a declared condition (an undeclared name is a bug: KeyError)."""
        with self._lock:
            if condition not in self._conditions:
                raise KeyError(f"undeclared readiness condition {condition!r}; declared: {sorted(self._conditions)}")
            self._conditions[condition] = Condition(ready, detail)

    def conditions(self) -> dict[str, Condition]:
        """A copy of every condition's state."""
        with self._lock:
            return dict(self._conditions)

    @property
    def ready(self) -> bool:
        """Whether every declared condition holds."""
        return all(c.ready for c in self.conditions().values())

    def watch_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop `/healthz` probes (the service's)."""
        self._loop = loop

    def alive(self, timeout_s: float = LIVENESS_TIMEOUT_S) -> bool:
        """Whether the watched loop runs a callback within `timeout_s` (True when no loop is watched: the
        process answers, and nothing else is known). Never call it from the loop itself."""
        loop = self._loop
        if loop is None:
            return True
        answered = threading.Event()
        try:
            loop.call_soon_threadsafe(answered.set)
        except RuntimeError:  # the loop is closed
            return False
        return answered.wait(timeout_s)


class GroupJoined(ConsumerRebalanceListener):
    """Marks `condition` ready each time the consumer completes a join of its group, with or without
    partitions (a member left idle because the group has more members than partitions is still ready)."""

    def __init__(self, health: Health, group: str, condition: str = "group"):
        self.health = health
        self.group = group
        self.condition = condition

    async def on_partitions_revoked(self, revoked: Iterable[TopicPartition]) -> None:
        """A rebalance starts: the member stays ready (it rejoins at once)."""

    async def on_partitions_assigned(self, assigned: Iterable[TopicPartition]) -> None:
        self.health.set(self.condition, True, f"member of group {self.group} with {len(list(assigned))} partitions")


StartResponse = Callable[[str, list[tuple[str, str]]], Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _json(start_response: StartResponse, ok: bool, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body, separators=(",", ":")).encode()
    start_response("200 OK" if ok else "503 Service Unavailable",
                   [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
    return [data]


def with_probes(health: Health, app: WsgiApp) -> WsgiApp:
    """`app` (the metrics endpoint) with `/healthz` and `/readyz` in front of it."""

    def probes(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == LIVENESS_PATH:
            alive = health.alive()
            return _json(start_response, alive, {"alive": alive})
        if path == READINESS_PATH:
            conditions = health.conditions()
            ready = all(c.ready for c in conditions.values())
            return _json(start_response, ready, {
                "ready": ready,
                "conditions": {name: {"ready": c.ready, "detail": c.detail} for name, c in conditions.items()},
            })
        return app(environ, start_response)

    return probes
