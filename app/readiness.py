"""What a supervisor asks to know whether a stack is up: engines answering `/health`, workers live in
the Redis registry, consumer groups stable with their members (services name their Kafka clients:
`dispatcher-<id>`, `learner`), how far a group is behind, and the current model snapshot."""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx
from aiokafka.errors import GroupCoordinatorNotAvailableError, GroupLoadInProgressError, NotCoordinatorForGroupError

from lodestar.kafka_admin import group_lag
from lodestar.kafka_io import make_admin, make_consumer
from lodestar.names import RedisKeys
from lodestar.redis_io import make_redis
from lodestar.settings import Settings
from lodestar.snapshot import Snapshot
from lodestar.snapshot_keys import verification_keys
from lodestar.snapshot_store import SnapshotStore
from lodestar.worker_registry import WorkerRegistry


@dataclass(frozen=True)
class GroupState:
    """A consumer group as the broker describes it: `Stable` once every member has its partitions."""

    state: str
    client_ids: tuple[str, ...]

    @property
    def stable(self) -> bool:
        return self.state == "Stable"


_COORDINATOR_NOT_READY = (GroupCoordinatorNotAvailableError, GroupLoadInProgressError, NotCoordinatorForGroupError)


class StackProbes:
    """Open clients for repeated readiness checks (use as an async context manager)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        api_key = settings.worker.engine_api_key.get_secret_value()
        # the engines' API key, if they have one (SGLang leaves /health open, not /server_info)
        self._http = httpx.AsyncClient(timeout=2.0, headers={"Authorization": f"Bearer {api_key}"} if api_key else None)
        self._redis = make_redis(settings)
        keys = RedisKeys(settings.redis.key_prefix)
        self._registry = WorkerRegistry(self._redis, keys, settings.worker.state_ttl_s)
        self._keys = keys
        self._admin = make_admin(settings, client_id="lodestar-probes")
        self._offsets = make_consumer(settings, group_id=None, client_id="lodestar-probes")

    async def __aenter__(self) -> StackProbes:
        await self._admin.start()
        await self._offsets.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._offsets.stop()
        await self._admin.close()
        await self._redis.aclose()
        await self._http.aclose()

    async def engine_healthy(self, base_url: str) -> bool:
        """Whether an SGLang engine (or the emulator) answers 200 on `/health` (it does once warmed up)."""
        try:
            return (await self._http.get(f"{base_url}/health")).status_code == 200
        except httpx.HTTPError:
            return False

    async def gateway_ready(self, base_url: str) -> bool:
        """Whether a gateway answers 200 on `/readyz` (its Kafka clients are up and it listens)."""
        try:
            return (await self._http.get(f"{base_url}/readyz")).status_code == 200
        except httpx.HTTPError:
            return False

    async def engine_info(self, base_url: str) -> dict[str, Any]:
        """An engine's `/server_info` (the emulator adds an `emulator` object with its clock's lag)."""
        response = await self._http.get(f"{base_url}/server_info")
        response.raise_for_status()
        return response.json()

    async def live_workers(self) -> set[str]:
        """Ids of the workers whose registry entry is live."""
        return {w.worker_id for w in await self._registry.live_workers()}

    async def group(self, group_id: str) -> GroupState:
        """The state and member client ids of a consumer group (`Dead`/empty if it has no members, or while the
        broker has no coordinator for it yet: a fresh broker creates its offsets topic at the first group and
        elects its leaders, and says so with these retriable errors, so a wait on the group goes on)."""
        try:
            responses = await self._admin.describe_consumer_groups([group_id])
        except _COORDINATOR_NOT_READY:
            return GroupState("Dead", ())
        for response in responses:
            for group in response.to_object()["groups"]:
                if group["error_code"] == 0 and group["group"] == group_id:
                    return GroupState(group["state"], tuple(sorted(m["client_id"] for m in group["members"])))
        return GroupState("Dead", ())

    async def group_lag(self, group_id: str, topic: str) -> int:
        """Records of `topic` the group has not committed yet (all of them if it committed nothing)."""
        return await group_lag(self._admin, self._offsets, group_id, topic)

    async def snapshot(self) -> Snapshot | None:
        """The verified model snapshot in Redis, or None if the learner has published none."""
        store = SnapshotStore(self._redis, self._keys, verification_keys=verification_keys(self.settings))
        return await store.load()
