"""Service metrics: exposition names and values, bounded labels, the /metrics endpoint, and that the Grafana
dashboard and Prometheus config only use metrics and ports that exist."""

from __future__ import annotations

import json
import math
import re
import socket

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lodestar.metrics import (
    DispatcherMetrics,
    LearnerMetrics,
    WorkerMetrics,
    kind_label,
    new_registry,
    start_metrics_server,
)
from lodestar.schemas import InferenceResult, RoutingDecision
from lodestar.settings import PROJECT_ROOT

DASHBOARD = PROJECT_ROOT / "configs" / "grafana" / "dashboards" / "lodestar.json"
PROMETHEUS = PROJECT_ROOT / "configs" / "prometheus.yml"
COMPOSE = PROJECT_ROOT / "compose.yaml"


def samples(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return samples(registry)[(name, frozenset(labels.items()))]


def exposed_names(registry: CollectorRegistry) -> set[str]:
    return {name for name, _ in samples(registry)}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def all_service_names() -> set[str]:
    """Every series name the services can expose, labelled series with no child yet included."""
    names: set[str] = set()
    for m in (DispatcherMetrics(CollectorRegistry()), WorkerMetrics("w", CollectorRegistry()),
              LearnerMetrics(CollectorRegistry())):
        for family in m.registry.collect():
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def test_dispatcher_exposition() -> None:
    m = DispatcherMetrics(CollectorRegistry())
    m.record_decision(RoutingDecision(worker_id="h100-0", policy="learned", explored=True))
    m.record_decision(RoutingDecision(worker_id="h100-0", policy="learned"))
    m.record_decision(RoutingDecision(worker_id="a30-0", policy="gpu_speed_queue"))
    m.batch_size.observe(3)
    m.record_routed(3, 0.004)
    m.record_dead_letter("invalid_message")
    r = m.registry
    assert value(r, "lodestar_dispatcher_decisions_total", policy="learned", worker="h100-0") == 2
    assert value(r, "lodestar_dispatcher_decisions_total", policy="gpu_speed_queue", worker="a30-0") == 1
    assert value(r, "lodestar_dispatcher_explored_total") == 1
    assert value(r, "lodestar_dispatcher_routing_latency_seconds_count") == 3
    assert value(r, "lodestar_dispatcher_routing_latency_seconds_bucket", le="0.005") == 3
    assert value(r, "lodestar_dispatcher_routing_latency_seconds_bucket", le="0.003") == 0
    assert value(r, "lodestar_dispatcher_batch_size_sum") == 3
    assert value(r, "lodestar_dispatcher_dlq_total", reason="invalid_message") == 1


def test_dispatcher_snapshot_version_and_age() -> None:
    m = DispatcherMetrics(CollectorRegistry())
    assert value(m.registry, "lodestar_dispatcher_snapshot_version") == 0
    assert math.isnan(value(m.registry, "lodestar_dispatcher_snapshot_age_seconds"))
    m.snapshot_loaded(7, created_at_s=1_000.0)
    assert value(m.registry, "lodestar_dispatcher_snapshot_version") == 7
    assert value(m.registry, "lodestar_dispatcher_snapshot_age_seconds") > 1e9  # now - 1000 s after the epoch
    m.snapshot_loaded(8)
    assert 0 <= value(m.registry, "lodestar_dispatcher_snapshot_age_seconds") < 60


def test_worker_exposition_in_seconds_per_worker() -> None:
    m = WorkerMetrics("h100-0", CollectorRegistry())
    r = m.registry
    assert value(r, "lodestar_worker_requests_total", worker="h100-0", status="error") == 0
    m.inflight.inc()
    m.record_result(InferenceResult(request_id="r", worker_id="h100-0", status="ok", ttft_ms=80.0, tpot_ms=12.0,
                                    e2e_ms=1_500.0))
    m.record_result(InferenceResult(request_id="r2", worker_id="h100-0", status="error"))
    m.record_engine_error("unavailable")
    assert value(r, "lodestar_worker_ttft_seconds_sum", worker="h100-0") == pytest.approx(0.08)
    assert value(r, "lodestar_worker_ttft_seconds_bucket", worker="h100-0", le="0.1") == 1
    assert value(r, "lodestar_worker_ttft_seconds_bucket", worker="h100-0", le="0.075") == 0
    assert value(r, "lodestar_worker_tpot_seconds_sum", worker="h100-0") == pytest.approx(0.012)
    assert value(r, "lodestar_worker_e2e_seconds_count", worker="h100-0") == 1  # the error carried no latency
    assert value(r, "lodestar_worker_inflight", worker="h100-0") == 1
    assert value(r, "lodestar_worker_requests_total", worker="h100-0", status="ok") == 1
    assert value(r, "lodestar_worker_requests_total", worker="h100-0", status="error") == 1
    assert value(r, "lodestar_worker_engine_errors_total", worker="h100-0", kind="unavailable") == 1


def test_learner_exposition() -> None:
    m = LearnerMetrics(CollectorRegistry())
    m.events.inc(2)
    m.record_rejected("absurd_latency")
    assert math.isnan(value(m.registry, "lodestar_learner_online_abs_error_seconds"))
    m.record_online_error(mae_ms=20.0, mape=0.2)
    m.snapshot_published(3)
    r = m.registry
    assert value(r, "lodestar_learner_events_total") == 2
    assert value(r, "lodestar_learner_rejected_total", reason="absurd_latency") == 1
    assert value(r, "lodestar_learner_online_abs_error_seconds") == pytest.approx(0.02)
    assert value(r, "lodestar_learner_online_relative_error") == pytest.approx(0.2)
    assert value(r, "lodestar_learner_snapshots_published_total") == 1
    assert value(r, "lodestar_learner_snapshot_version") == 3


def test_free_text_labels_are_refused() -> None:
    assert kind_label("engine_unavailable") == "engine_unavailable"
    for bad in ("", "Invalid JSON at line 1", "x" * 65, "503"):
        with pytest.raises(ValueError):
            kind_label(bad)
    with pytest.raises(ValueError):
        DispatcherMetrics(CollectorRegistry()).record_dead_letter("1 validation error for InferenceRequest")


def test_service_registry_carries_process_metrics_and_registries_are_separate() -> None:
    a, b = DispatcherMetrics(), DispatcherMetrics()  # two in one process must not collide
    assert "process_cpu_seconds_total" in exposed_names(a.registry)
    a.record_decision(RoutingDecision(worker_id="w", policy="p"))
    assert ("lodestar_dispatcher_decisions_total", frozenset({("policy", "p"), ("worker", "w")})) not in samples(
        b.registry)
    assert "python_info" in exposed_names(new_registry())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_metrics_server_serves_the_registry_and_port_zero_disables_it() -> None:
    assert start_metrics_server(CollectorRegistry(), 0) is None
    m = LearnerMetrics(CollectorRegistry())
    m.events.inc()
    server = start_metrics_server(m.registry, _free_port())
    assert server is not None
    try:
        body = httpx.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5).text
    finally:
        server.close()
    assert "lodestar_learner_events_total 1.0" in body


def test_dashboard_queries_use_only_defined_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 12
    referenced = {name for e in exprs for name in re.findall(r"\blodestar_[a-z_]+\b", e)}
    defined = all_service_names()
    assert referenced <= defined, referenced - defined
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in referenced}
    for needed in ("lodestar_dispatcher_decisions", "lodestar_dispatcher_routing_latency_seconds",
                   "lodestar_dispatcher_explored", "lodestar_dispatcher_snapshot_version",
                   "lodestar_dispatcher_snapshot_age_seconds", "lodestar_dispatcher_dlq",
                   "lodestar_worker_ttft_seconds", "lodestar_worker_tpot_seconds", "lodestar_worker_inflight",
                   "lodestar_worker_engine_errors", "lodestar_learner_events",
                   "lodestar_learner_online_abs_error_seconds"):
        assert needed in families, needed


def test_prometheus_scrapes_the_metrics_port_the_services_are_given() -> None:
    prometheus = yaml.safe_load(PROMETHEUS.read_text())
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    for service in ("dispatcher", "learner", "worker-h100", "worker-a30"):
        env = compose[service]["environment"]
        port = next(int(v) for k, v in env.items() if k.endswith("__METRICS_PORT"))
        job = jobs[service.split("-")[0]]
        dns = [name for sd in job["dns_sd_configs"] for name in sd["names"]]
        assert service in dns, (service, dns)
        assert all(sd["port"] == port for sd in job["dns_sd_configs"])
