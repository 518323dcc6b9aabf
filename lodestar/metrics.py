"""Prometheus metrics of each service, on a per-service registry, and the endpoint that serves them.

Names follow Prometheus conventions: `lodestar_<service>_<what>_<unit>`, base units (seconds), `_total`
for counters. Labels stay bounded: worker ids and policy names (a cluster's worth), and for reasons and
error kinds a short fixed word (`invalid_message`, `engine_unavailable`), never an exception's text:
`kind_label` refuses anything else so that a free-text reason cannot explode the series count.

Each service builds one typed object (`DispatcherMetrics()`, `WorkerMetrics(worker_id)`,
`LearnerMetrics()`) and serves its `.registry` with `start_metrics_server`, beside its liveness and
readiness probes (lodestar/health.py; docs/observability.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import socket
import threading
import time
from dataclasses import dataclass
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

from lodestar.health import Health, with_probes
from lodestar.schemas import InferenceResult, RoutingDecision

# Time to first token: tens of milliseconds on an idle H100 to tens of seconds behind a long queue.
TTFT_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0,
                  15.0, 20.0, 30.0, 60.0)
# Time per output token: a few milliseconds (small model, small batch) to a few hundred under heavy load.
TPOT_BUCKETS_S = (0.002, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                  0.5, 1.0)
# End to end: a short answer in a fraction of a second to a long generation in minutes.
E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0,
                 300.0, 600.0)
# Routing overhead (consume to acknowledged publish): sub-millisecond to a slow broker round trip.
ROUTING_BUCKETS_S = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25,
                     0.5, 1.0, 2.5)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)

_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def kind_label(value: str) -> str:
    """Validate a reason/kind label value: a short snake_case word (bounded cardinality)."""
    if not _KIND.match(value):
        raise ValueError(f"label value {value!r} must be a short snake_case kind, not free text")
    return value


def new_registry() -> CollectorRegistry:
    """A service's own registry, with the process, platform and GC metrics of the standard one."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


@dataclass(frozen=True)
class MetricsServer:
    """A running `/metrics` endpoint (a daemon thread)."""

    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self.server.server_port)

    def close(self) -> None:
        """Stop serving and release the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        """Probes and scrapes every few seconds: no access log."""


def start_metrics_server(
    registry: CollectorRegistry, port: int, host: str = "127.0.0.1", health: Health | None = None
) -> MetricsServer | None:
    """Serve `registry` at http://host:port/metrics in a daemon thread (a thread per request), and with
    `health` also `/healthz` and `/readyz` (lodestar/health.py), probing the event loop that called this;
    port 0 means disabled (None)."""
    if port == 0:
        return None
    app = make_wsgi_app(registry)
    if health is not None:
        with contextlib.suppress(RuntimeError):  # no loop in this thread: /healthz tells only that it answers
            health.watch_loop(asyncio.get_running_loop())
        app = with_probes(health, app)

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    server = make_server(host, port, app, Server, handler_class=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, name=f"metrics-{port}", daemon=True)
    thread.start()
    return MetricsServer(server, thread)


class DispatcherMetrics:
    """Decisions, routing latency, exploration, the model snapshot in use, batches and dead letters."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.decisions = Counter("lodestar_dispatcher_decisions", "Requests routed, by policy and chosen worker.",
                                 ["policy", "worker"], registry=r)
        self.explored = Counter("lodestar_dispatcher_explored", "Routing decisions that explored instead of "
                                "taking the policy's best worker.", registry=r)
        self.routing_latency = Histogram("lodestar_dispatcher_routing_latency_seconds", "Per request, from the "
                                         "batch being consumed to the routed message acknowledged by the broker.",
                                         buckets=ROUTING_BUCKETS_S, registry=r)
        self.batch_size = Histogram("lodestar_dispatcher_batch_size", "Records per consumed batch.",
                                    buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.dlq = Counter("lodestar_dispatcher_dlq", "Messages sent to the dead-letter topic, by reason kind.",
                           ["reason"], registry=r)
        self.answered = Counter("lodestar_dispatcher_answered", "Requests the dispatcher answered itself instead "
                                "of routing them, by reason kind (deadline_exceeded, no_worker).", ["reason"],
                                registry=r)
        self.batch_retries = Counter("lodestar_dispatcher_batch_retries", "Batches held uncommitted and retried "
                                     "after a transient failure (broker or Redis unavailable, no worker).",
                                     registry=r)
        self.redis_writes_skipped = Counter("lodestar_dispatcher_redis_writes_skipped", "Non-essential Redis "
                                            "writes skipped because Redis was out of memory, by write.",
                                            ["write"], registry=r)
        self.snapshot_version = Gauge("lodestar_dispatcher_snapshot_version", "Version of the model snapshot in "
                                      "use (0: none yet).", registry=r)
        self.snapshot_age = Gauge("lodestar_dispatcher_snapshot_age_seconds", "Seconds since the learner created "
                                  "the snapshot in use (NaN: none yet).", registry=r)
        self._snapshot_created_at = math.nan
        self.snapshot_age.set_function(lambda: time.time() - self._snapshot_created_at)

    def record_decision(self, decision: RoutingDecision) -> None:
        """Count one routing decision (and its exploration)."""
        self.decisions.labels(policy=decision.policy, worker=decision.worker_id).inc()
        if decision.explored:
            self.explored.inc()

    def record_routed(self, requests: int, seconds: float) -> None:
        """`requests` routed together, acknowledged `seconds` after their batch was consumed: one latency
        observation per request (each waited for the whole batch's acknowledgements)."""
        for _ in range(requests):
            self.routing_latency.observe(seconds)

    def record_dead_letter(self, reason: str) -> None:
        """One message to the DLQ; `reason` is a short kind such as `invalid_message`."""
        self.dlq.labels(reason=kind_label(reason)).inc()

    def record_answered(self, reason: str) -> None:
        """One request answered by the dispatcher itself; `reason` is a short kind."""
        self.answered.labels(reason=kind_label(reason)).inc()

    def record_redis_write_skipped(self, write: str) -> None:
        """One non-essential Redis write skipped (out of memory); `write` is a short kind."""
        self.redis_writes_skipped.labels(write=kind_label(write)).inc()

    def snapshot_loaded(self, version: int, created_at_s: float | None = None) -> None:
        """A model snapshot is in use; `created_at_s` is its creation time (epoch seconds, default now)."""
        self.snapshot_version.set(version)
        self._snapshot_created_at = time.time() if created_at_s is None else created_at_s


class WorkerMetrics:
    """Latencies the worker measured on its engine, requests in flight, outcomes and engine errors.

    Every series carries `worker=<worker_id>`, so dashboards group by worker whatever the scrape target.
    """

    def __init__(self, worker_id: str, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else new_registry()
        self.worker_id = worker_id
        r = self.registry
        self.ttft = Histogram("lodestar_worker_ttft_seconds", "Time to first token (first non-empty chunk).",
                              ["worker"], buckets=TTFT_BUCKETS_S, registry=r).labels(worker=worker_id)
        self.tpot = Histogram("lodestar_worker_tpot_seconds", "Time per output token after the first.",
                              ["worker"], buckets=TPOT_BUCKETS_S, registry=r).labels(worker=worker_id)
        self.e2e = Histogram("lodestar_worker_e2e_seconds", "End-to-end generation time on the engine.",
                             ["worker"], buckets=E2E_BUCKETS_S, registry=r).labels(worker=worker_id)
        self.inflight = Gauge("lodestar_worker_inflight", "Requests being served on the engine right now.",
                              ["worker"], registry=r).labels(worker=worker_id)
        self._engine_errors = Counter("lodestar_worker_engine_errors", "Engine calls that failed, by kind.",
                                      ["worker", "kind"], registry=r)
        self._requests = Counter("lodestar_worker_requests", "Requests answered, by final status.",
                                 ["worker", "status"], registry=r)
        for status in ("ok", "error", "rejected"):
            self._requests.labels(worker=worker_id, status=status)  # expose zeros: rate() sees the first one
        self._answered = Counter("lodestar_worker_answered", "Requests answered without generating, by kind "
                                 "(replayed, not_replayable, id_conflict, deadline_exceeded).", ["worker", "reason"],
                                 registry=r)
        self._dlq = Counter("lodestar_worker_dlq", "Records sent to the dead-letter topic, by stage.",
                            ["worker", "stage"], registry=r)
        self._redis_writes_skipped = Counter("lodestar_worker_redis_writes_skipped", "Non-essential Redis writes "
                                             "skipped (out of memory, or refused), by write.", ["worker", "write"],
                                             registry=r)
        self.breaker_open = Gauge("lodestar_worker_breaker_open", "1 while the engine's circuit breaker is open or "
                                  "half-open (the worker is not routable), else 0.", ["worker"],
                                  registry=r).labels(worker=worker_id)
        self.breaker_opened = Counter("lodestar_worker_breaker_opened", "Times the engine's circuit breaker opened "
                                      "(the engine declared dead).", ["worker"], registry=r).labels(worker=worker_id)

    def record_result(self, result: InferenceResult) -> None:
        """Count a final result and observe the latencies it carries (milliseconds in, seconds out)."""
        self._requests.labels(worker=self.worker_id, status=result.status).inc()
        for histogram, ms in ((self.ttft, result.ttft_ms), (self.tpot, result.tpot_ms), (self.e2e, result.e2e_ms)):
            if ms is not None:
                histogram.observe(ms / 1000.0)

    def record_engine_error(self, kind: str) -> None:
        """One failed engine call; `kind` is a short kind such as `unavailable`, `timeout`, `rejected`."""
        self._engine_errors.labels(worker=self.worker_id, kind=kind_label(kind)).inc()

    def record_answered(self, reason: str) -> None:
        """One request answered without generating; `reason` is a short kind such as `replayed`."""
        self._answered.labels(worker=self.worker_id, reason=kind_label(reason)).inc()

    def record_dead_letter(self, stage: str) -> None:
        """One record to the DLQ; `stage` is the dead letter's stage (`decode`, `serve`, `publish`, `dedupe`)."""
        self._dlq.labels(worker=self.worker_id, stage=kind_label(stage)).inc()

    def record_redis_write_skipped(self, write: str) -> None:
        """One non-essential Redis write skipped; `write` is a short kind (`store`, `mark_done`)."""
        self._redis_writes_skipped.labels(worker=self.worker_id, write=kind_label(write)).inc()

    def record_breaker(self, state: str) -> None:
        """The engine's circuit breaker entered `state` (`closed`, `open`, `half_open`)."""
        self.breaker_open.set(0 if state == "closed" else 1)
        if state == "open":
            self.breaker_opened.inc()


class LearnerMetrics:
    """Events learned and rejected, the online (prequential) prediction error, snapshots published."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self.events = Counter("lodestar_learner_events", "Telemetry events learned from.", registry=r)
        self._rejected = Counter("lodestar_learner_rejected", "Telemetry events rejected to the DLQ, by reason "
                                 "kind.", ["reason"], registry=r)
        self.abs_error = Gauge("lodestar_learner_online_abs_error_seconds", "Mean |predicted - observed| TTFT over "
                               "the learner's recent window, each event predicted before it was learned "
                               "(NaN: none yet).", registry=r)
        self.relative_error = Gauge("lodestar_learner_online_relative_error", "Mean |predicted - observed| / "
                                    "observed TTFT over the same window (NaN: none yet).", registry=r)
        self.abs_error.set(math.nan)
        self.relative_error.set(math.nan)
        self.snapshots_published = Counter("lodestar_learner_snapshots_published", "Model snapshots published.",
                                           registry=r)
        self.snapshot_version = Gauge("lodestar_learner_snapshot_version", "Version of the last snapshot "
                                      "published.", registry=r)

    def record_rejected(self, reason: str) -> None:
        """One telemetry event rejected; `reason` is a short kind such as `absurd_latency`."""
        self._rejected.labels(reason=kind_label(reason)).inc()

    def record_online_error(self, mae_ms: float, mape: float) -> None:
        """The learner's rolling prequential error: mean absolute error (ms) and mean relative error."""
        self.abs_error.set(mae_ms / 1000.0)
        self.relative_error.set(mape)

    def snapshot_published(self, version: int) -> None:
        """A snapshot went out."""
        self.snapshots_published.inc()
        self.snapshot_version.set(version)


class GatewayMetrics:
    """HTTP requests by route and status, time to first byte of the answer, requests in flight, refusals (rate
    limit, saturation), aborts, and replies nobody waited for."""

    def __init__(self, gateway_id: str, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else new_registry()
        self.gateway_id = gateway_id
        r = self.registry
        self._requests = Counter("lodestar_gateway_requests", "HTTP requests answered, by route and status code.",
                                 ["gateway", "route", "code"], registry=r)
        self.ttft = Histogram("lodestar_gateway_ttft_seconds", "From the HTTP request to its first output at the "
                              "gateway (a streamed chunk, or the whole answer).", ["gateway"],
                              buckets=TTFT_BUCKETS_S, registry=r).labels(gateway=gateway_id)
        self.inflight = Gauge("lodestar_gateway_inflight", "Requests in the pipeline for this gateway.", ["gateway"],
                              registry=r).labels(gateway=gateway_id)
        self._refused = Counter("lodestar_gateway_refused", "Requests refused before entering the pipeline, by "
                                "reason.", ["gateway", "reason"], registry=r)
        self._aborted = Counter("lodestar_gateway_aborted", "Requests abandoned before their end, by reason "
                                "(client_disconnect, deadline, interrupted).", ["gateway", "reason"], registry=r)
        self.orphan_replies = Gauge("lodestar_gateway_orphan_replies", "Replies read for requests no longer "
                                    "followed (since start).", ["gateway"], registry=r).labels(gateway=gateway_id)

    def record_request(self, route: str, code: int) -> None:
        """One answered HTTP request; `route` is the route's path template (bounded)."""
        self._requests.labels(gateway=self.gateway_id, route=route, code=str(code)).inc()

    def record_refused(self, reason: str) -> None:
        """One request refused; `reason` is a short kind such as `rate_limited`, `saturated`, `unauthorized`."""
        self._refused.labels(gateway=self.gateway_id, reason=kind_label(reason)).inc()

    def record_aborted(self, reason: str) -> None:
        """One request abandoned before its end; `reason` is a short kind."""
        self._aborted.labels(gateway=self.gateway_id, reason=kind_label(reason)).inc()
