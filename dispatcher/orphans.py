"""Dead workers the registry does not know: found from their topic's consumer lag.

Dead-worker takeover (dispatcher/redispatch.py) starts from `workers:seen`, the last heartbeat of every
worker a dispatcher saw. If Redis restarts empty, that record is gone, and a worker that died in that window
(or before any dispatcher saw it) would keep its backlog for ever. So the broker is asked as well: a worker
topic (`<prefix>worker.<id>`) whose consumer group has no member and whose committed offsets are behind the
topic's end (records nobody is serving) belongs to an orphan. `find` returns such workers that the caller does
not already know; the takeover records them as seen now, so they are taken over after the same
`dead_worker_timeout_s` as any silent worker (a worker that comes back meanwhile is live again).
"""

from __future__ import annotations

import logging

from lodestar.kafka_admin import group_lag
from lodestar.kafka_io import make_admin, make_consumer
from lodestar.names import Topics, check_worker_id
from lodestar.settings import Settings

log = logging.getLogger(__name__)


class OrphanFinder:
    """Asks the broker which worker topics have a backlog and no consumer (one short-lived client per call)."""

    def __init__(self, settings: Settings, client_id: str):
        self.settings = settings
        self.client_id = client_id
        self.topics = Topics(settings.kafka.topic_prefix)

    async def find(self, known: set[str]) -> list[str]:
        """Ids of workers not in `known` whose topic has uncommitted records and whose group has no member."""
        admin = make_admin(self.settings, client_id=self.client_id)
        offsets = make_consumer(self.settings, group_id=None, client_id=self.client_id)
        await admin.start()
        try:
            await offsets.start()
            candidates: dict[str, str] = {}
            for topic in await admin.list_topics():
                if not topic.startswith(self.topics.worker_topic_prefix):
                    continue
                worker_id = topic.removeprefix(self.topics.worker_topic_prefix)
                try:
                    check_worker_id(worker_id)
                except ValueError:
                    continue
                if worker_id not in known:
                    candidates[worker_id] = topic
            orphans = []
            for worker_id, topic in sorted(candidates.items()):
                group = self.topics.worker_group(worker_id)
                if await self._has_members(admin, group):
                    continue
                if await group_lag(admin, offsets, group, topic) > 0:
                    orphans.append(worker_id)
            return orphans
        finally:
            await offsets.stop()
            await admin.close()

    @staticmethod
    async def _has_members(admin, group: str) -> bool:  # noqa: ANN001 - aiokafka's admin client
        for response in await admin.describe_consumer_groups([group]):
            for described in response.to_object()["groups"]:
                if described["group"] == group and described["members"]:
                    return True
        return False
