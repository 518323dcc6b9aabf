"""The gateway service: an OpenAI-compatible HTTP front door onto the pipeline (docs/gateway.md).

One process serves HTTP (starlette on uvicorn, gateway/http.py) and is a Lodestar client on its own reply
topic `<prefix>reply.<gateway id>` (lodestar/client.py): each HTTP request becomes one InferenceRequest per
prompt on `lodestar.requests` with that topic as `reply_to`, and is answered from the StreamChunks and the
InferenceResult the worker publishes there. Any number of gateways run side by side, each reading only its
own replies; its topic is created at start (`gateway.reply_partitions`) and read from its end.

Admission, before anything enters the pipeline: the API key (gateway/auth.py, 401), its rate limit (429),
then saturation (`admit`): more than `gateway.max_in_flight` requests of this gateway in the pipeline, or
engines queueing more than `gateway.max_waiting_per_worker` requests per routable worker on average (the
worker registry, read every WORKER_VIEW_S), is a 429 with Retry-After; no routable worker is a 503.

A request ends when its result arrives, at its deadline (`gateway.request_timeout_s`, also its
`deadline_ms` on the wire: 504), or when its client disconnects. In the last two cases the gateway writes
`abort:<request id>` in Redis: the worker serving it (or about to) stops the generation and tells its engine
(`/abort_request`); a worker that claims it later answers it without generating (workers/dedupe.py).

Readiness (`/readyz`, lodestar/health.py's conditions): `kafka` (producer started, reply topic positioned)
and `http` (the server listens; not ready any more once stopping). Stopping (SIGTERM): readiness turns
false, the server stops accepting connections and waits up to SHUTDOWN_GRACE_S for the answers under way,
then the Kafka clients stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import socket
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
import uvicorn
from redis.exceptions import RedisError

from gateway.auth import ApiKeys, RateLimiter
from gateway.errors import ApiError
from gateway.request_models import Plan
from lodestar.client import LodestarClient, Reply
from lodestar.health import Health
from lodestar.kafka_admin import fixed_topic_partitions
from lodestar.kafka_io import make_admin
from lodestar.lifecycle import ServiceScope, service_lifecycle
from lodestar.limits import Limits
from lodestar.metrics import GatewayMetrics
from lodestar.names import RedisKeys, Topics, check_worker_id
from lodestar.redis_io import make_redis
from lodestar.settings import ConfigurationError, Settings
from lodestar.worker_registry import WorkerRegistry

log = logging.getLogger(__name__)

SERVICE = "gateway"
WORKER_VIEW_S = 0.5  # how often the worker registry is read for saturation
SHUTDOWN_GRACE_S = 30.0  # how long a stopping gateway waits for the answers under way
ABORT_MARK_MIN_S = 60  # an abort key outlives the request's deadline by this much
REDIS_CONNECTIONS = 64
# what an InferenceRequest adds to the body it is made from (ids, reply topic, deadline, the engine API's options
# with their defaults filled in, JSON framing), generously
REQUEST_OVERHEAD_BYTES = 16 * 1024


def default_gateway_id() -> str:
    """`<host>-<pid>`, reduced to the characters a topic name takes."""
    return re.sub(r"[^A-Za-z0-9._-]", "-", f"{socket.gethostname()}-{os.getpid()}")[:200]


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the gateway's command decides what a signal does."""

    @contextlib.contextmanager
    def capture_signals(self):  # type: ignore[no-untyped-def, override]
        yield


def check_limits(settings: Settings, reply_topic: str) -> None:
    """Refuse settings under which the pipeline would refuse every request of this gateway: a reply topic
    outside limits.reply_to_pattern, or bodies that may make requests larger than limits allow."""
    limits = Limits(settings)
    refusal = limits.reply_topics.refusal(reply_topic)
    if refusal is not None:
        raise ConfigurationError(f"gateway: {refusal}; allow it in limits.reply_to_pattern")
    largest = limits.max_request_bytes - REQUEST_OVERHEAD_BYTES
    if settings.gateway.max_body_bytes > largest:
        raise ConfigurationError(f"gateway.max_body_bytes={settings.gateway.max_body_bytes} is over {largest}: a "
                                 "request made from such a body may not fit limits.max_message_bytes")


class GatewayService:
    """One gateway. Construct inside a running event loop, then `await run()`."""

    def __init__(self, settings: Settings, *, metrics: GatewayMetrics | None = None,
                 redis: aioredis.Redis | None = None):
        g = settings.gateway
        self.settings = settings
        self.gateway_id = check_worker_id(g.gateway_id or default_gateway_id())
        self.topics = Topics(settings.kafka.topic_prefix)
        self.reply_topic = self.topics.reply(self.gateway_id)
        check_limits(settings, self.reply_topic)
        self.keys = ApiKeys(g.api_key_hashes, g.allow_anonymous)
        self.redis_keys = RedisKeys(settings.redis.key_prefix)
        self._redis = redis if redis is not None else make_redis(settings, pool_size=REDIS_CONNECTIONS)
        self.limiter = RateLimiter(self._redis, self.redis_keys, g.rate_limit_per_s, g.rate_limit_burst)
        self.registry = WorkerRegistry(self._redis, self.redis_keys, settings.worker.state_ttl_s)
        self.client = LodestarClient(settings, reply_topic=self.reply_topic, client_id=f"gateway-{self.gateway_id}")
        self.metrics = metrics if metrics is not None else GatewayMetrics(self.gateway_id)
        self.health = Health("kafka", "http")
        self.started_at = int(time.time())
        self.inflight = 0
        self.routable_workers: int | None = None  # unknown until the registry is first read
        self.waiting_per_worker = 0.0
        self.server: uvicorn.Server | None = None
        self._stopping = False
        self._failure: BaseException | None = None

    # ---- lifecycle -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop taking requests, finish the ones under way (up to SHUTDOWN_GRACE_S), then leave."""
        if self._stopping:
            if self.server is not None:
                self.server.force_exit = True
            return
        log.info("gateway %s stopping: %d requests in flight", self.gateway_id, self.inflight)
        self._stopping = True
        self.health.set("http", False, "stopping: takes no more requests")
        if self.server is not None:
            self.server.should_exit = True

    async def run(self, app: object) -> None:
        """Serve `app` (gateway/http.py's, built on this service) until stopped."""
        g = self.settings.gateway
        producer, consumer = self.client.connect()
        topics = {**fixed_topic_partitions(self.settings), self.reply_topic: g.reply_partitions}
        closers = [self._close_redis]
        if g.delete_reply_topic:
            closers.insert(0, self._delete_reply_topic)
        # httptools: uvicorn's C HTTP parser (its pure-Python h11 costs more per streamed event)
        config = uvicorn.Config(app, host=g.host, port=g.port, http="httptools", log_config=None, access_log=False,
                                lifespan="off", timeout_graceful_shutdown=int(SHUTDOWN_GRACE_S), timeout_keep_alive=30)
        self.server = _Server(config)
        async with service_lifecycle(self.settings, topics, producer=producer, consumers=[consumer],
                                     closers=closers) as scope:
            await self.client.attach()
            scope.spawn(self.client.read_replies())
            self.health.set("kafka", True, f"producing to {self.topics.requests}, reading {self.reply_topic}")
            scope.spawn(self._watch(scope))
            log.info("gateway %s serving http://%s:%d, replies on %s", self.gateway_id, g.host, g.port,
                     self.reply_topic)
            if not self._stopping:
                await self.server.serve()
            self.client.cancel_all()
        if self._failure is not None:
            raise self._failure
        log.info("gateway %s stopped", self.gateway_id)

    async def _close_redis(self) -> None:
        await self._redis.aclose(close_connection_pool=True)

    async def _delete_reply_topic(self) -> None:
        admin = make_admin(self.settings, client_id=f"lodestar-gateway-{self.gateway_id}")
        try:
            await admin.start()
            await admin.delete_topics([self.reply_topic])
        except Exception as exc:  # best effort: the topic only takes space
            log.warning("gateway %s could not delete %s: %r", self.gateway_id, self.reply_topic, exc)
        finally:
            await admin.close()

    async def _watch(self, scope: ServiceScope) -> None:
        """Keep the saturation view and readiness current; stop the server if a background task died."""
        while True:
            try:
                scope.check_background()
            except BaseException as exc:
                log.error("gateway %s: a background task failed: %r", self.gateway_id, exc)
                self._failure = exc
                self.request_stop()
                return
            server = self.server
            if server is not None and server.started and not self._stopping:
                self.health.set("http", True, f"listening on port {self.settings.gateway.port}")
            try:
                live = [w for w in await self.registry.live_workers() if not w.draining]
            except (RedisError, OSError) as exc:
                log.warning("gateway %s: worker registry unavailable: %r", self.gateway_id, exc)
            else:
                self.routable_workers = len(live)
                self.waiting_per_worker = sum(w.waiting for w in live) / len(live) if live else 0.0
            self.metrics.orphan_replies.set(self.client.orphan_replies)
            await asyncio.sleep(WORKER_VIEW_S)

    # ---- admission and requests ------------------------------------------------------------------

    def admit(self, count: int) -> None:
        """Refuse (ApiError) a request of `count` InferenceRequests when the pipeline cannot take it now."""
        g = self.settings.gateway
        if self._stopping:
            raise ApiError(503, "the gateway is shutting down", code="shutting_down", retry_after_s=1)
        if self.inflight + count > g.max_in_flight:
            self.metrics.record_refused("gateway_full")
            raise ApiError(429, f"this gateway has {self.inflight} requests in flight (limit {g.max_in_flight})",
                           code="too_many_requests", retry_after_s=1)
        if self.routable_workers == 0:
            self.metrics.record_refused("no_worker")
            raise ApiError(503, "no worker is available to serve the request", code="no_worker", retry_after_s=5)
        if g.max_waiting_per_worker and self.waiting_per_worker >= g.max_waiting_per_worker:
            self.metrics.record_refused("saturated")
            raise ApiError(429, f"the pipeline is saturated: its engines queue {self.waiting_per_worker:.0f} "
                           f"requests per worker (limit {g.max_waiting_per_worker:g})", code="saturated",
                           retry_after_s=1)

    @contextlib.asynccontextmanager
    async def exchange(self, plan: Plan) -> AsyncIterator[list[Reply]]:
        """Send the plan's requests and yield their replies; on the way out, whatever is not answered yet is
        aborted (its client left, or its deadline passed) and forgotten."""
        count = len(plan.requests)
        self.inflight += count
        self.metrics.inflight.inc(count)
        replies: list[Reply] = []
        try:
            max_chars = self.settings.gateway.max_reply_chars
            if count == 1:
                replies.append(await self.client.send(plan.requests[0], max_chars))
            else:
                replies.extend(await asyncio.gather(*(self.client.send(r, max_chars) for r in plan.requests)))
            yield replies
        finally:
            for reply, request in zip(replies, plan.requests, strict=False):
                self.client.forget(request.request_id)
                if not reply.answered:
                    await self.abort(request.request_id, request.deadline_ms)
            self.inflight -= count
            self.metrics.inflight.dec(count)

    async def abort(self, request_id: str, deadline_ms: float | None) -> None:
        """Ask the pipeline to stop a request (`abort:<request id>`, kept past the request's deadline)."""
        left_s = (deadline_ms - time.time() * 1000.0) / 1000.0 if deadline_ms else 0.0
        ttl = max(ABORT_MARK_MIN_S, math.ceil(left_s) + ABORT_MARK_MIN_S)
        try:
            await self._redis.set(self.redis_keys.abort(request_id), self.gateway_id, ex=ttl)
        except (RedisError, OSError) as exc:  # the request then runs to its end: wasted, not wrong
            log.warning("gateway %s could not abort %s: %r", self.gateway_id, request_id, exc)
