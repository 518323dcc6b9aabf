"""Kafka topic names and Redis key builders, in one place."""

from __future__ import annotations

import re
from dataclasses import dataclass

WORKER_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,200}$")


def check_worker_id(worker_id: str) -> str:
    """Validate a worker id (it becomes part of a topic name and Redis keys)."""
    if not WORKER_ID_PATTERN.match(worker_id):
        raise ValueError(f"worker id {worker_id!r} must match {WORKER_ID_PATTERN.pattern}")
    return worker_id


@dataclass(frozen=True)
class Topics:
    """Topic names under a configurable prefix (default `lodestar.`)."""

    prefix: str = "lodestar."

    @property
    def requests(self) -> str:
        return f"{self.prefix}requests"

    @property
    def results(self) -> str:
        return f"{self.prefix}results"

    @property
    def telemetry(self) -> str:
        return f"{self.prefix}telemetry"

    @property
    def dlq(self) -> str:
        return f"{self.prefix}dlq"

    @property
    def worker_topic_prefix(self) -> str:
        """What every worker's topic name starts with."""
        return f"{self.prefix}worker."

    @property
    def worker_group_prefix(self) -> str:
        """What every worker's consumer group name starts with."""
        return f"{self.prefix.rstrip('.')}-worker-"

    @property
    def reply_prefix(self) -> str:
        """What every per-client reply topic name starts with."""
        return f"{self.prefix}reply."

    def worker(self, worker_id: str) -> str:
        """The topic a worker consumes its routed requests from."""
        return f"{self.worker_topic_prefix}{check_worker_id(worker_id)}"

    def worker_group(self, worker_id: str) -> str:
        """The consumer group of a worker on its topic (`lodestar-worker-<id>` under the default prefix);
        a dispatcher joins it to take over a dead worker's backlog."""
        return f"{self.worker_group_prefix}{check_worker_id(worker_id)}"

    def reply(self, name: str) -> str:
        """A client's own reply topic (`<prefix>reply.<name>`; a gateway's name is its id)."""
        return f"{self.prefix}reply.{check_worker_id(name)}"

    def fixed(self) -> list[str]:
        """The topics that exist independently of workers."""
        return [self.requests, self.results, self.telemetry, self.dlq]


@dataclass(frozen=True)
class RedisKeys:
    """Redis key builders under a configurable prefix (default `lodestar:`)."""

    prefix: str = "lodestar:"

    @property
    def workers(self) -> str:
        """Set of registered worker ids."""
        return f"{self.prefix}workers"

    def worker_state(self, worker_id: str) -> str:
        """Hash of one worker's live state, with a TTL renewed by heartbeats."""
        return f"{self.prefix}worker:{check_worker_id(worker_id)}"

    def prefix_index(self, worker_id: str) -> str:
        """Sorted set of block hashes believed cached on a worker, scored by last use."""
        return f"{self.prefix}prefix:{check_worker_id(worker_id)}"

    @property
    def prefix_holders(self) -> str:
        """Start of the key of a chain root's holders: the set of the workers whose prefix index holds that
        first block (the rest of the key is the root's 12-byte member); `~` is in no worker id."""
        return f"{self.prefix}prefix:~holders:"

    @property
    def prefix_roots(self) -> str:
        """Start of the key of a worker's roots: the set of the first blocks it holds (then the worker id)."""
        return f"{self.prefix}prefix:~roots:"

    @property
    def prefix_capacity(self) -> str:
        """Hash of per-worker prefix index capacities in blocks (absent: the configured default)."""
        return f"{self.prefix}prefix-capacity"

    @property
    def snapshot(self) -> str:
        """Hash holding the current model snapshot (version, payload, signature)."""
        return f"{self.prefix}model:snapshot"

    @property
    def snapshot_channel(self) -> str:
        """Pub/sub channel announcing a new snapshot version."""
        return f"{self.prefix}model:announce"

    @property
    def workers_seen(self) -> str:
        """Sorted set of every worker id ever heard from, scored by its last heartbeat (ms)."""
        return f"{self.prefix}workers:seen"

    def takeover_lock(self, worker_id: str) -> str:
        """Lock held by the one dispatcher re-routing a dead worker's backlog."""
        return f"{self.prefix}takeover:{check_worker_id(worker_id)}"

    def dedupe(self, request_id: str) -> str:
        """Marker that a worker has taken a request id (at-least-once dedupe)."""
        return f"{self.prefix}dedupe:{request_id}"

    def result(self, request_id: str) -> str:
        """Cached final result of a request, replayed if the request is redelivered."""
        return f"{self.prefix}result:{request_id}"

    def abort(self, request_id: str) -> str:
        """Marker that a request's client went away: the worker serving it (or about to) aborts it."""
        return f"{self.prefix}abort:{request_id}"

    def rate_limit(self, key_id: str) -> str:
        """Token bucket of one API key at the gateways (hash: tokens, updated_at)."""
        return f"{self.prefix}ratelimit:{key_id}"
