"""The emulator's Prometheus metrics: SGLang's `sglang:` series, in a registry private to one app.

Per-request series (counters, TTFT / inter-token / end-to-end histograms with SGLang's default buckets)
are labelled `model_name` as SGLang's TokenizerMetricsCollector does; the scheduler gauges carry
`model_name, engine_type, tp_rank, pp_rank` as its SchedulerMetricsCollector does, and are read from
the engine when `/metrics` is scraped rather than pushed every step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200,
               1800, 2400)
ITL_BUCKETS = (0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
               0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)

# name -> help text, for the gauges the scheduler reports
SCHEDULER_GAUGES: dict[str, str] = {
    "num_running_reqs": "The number of running requests.",
    "num_queue_reqs": "The number of requests in the waiting queue.",
    "num_used_tokens": "The number of used tokens.",
    "token_usage": "The token usage.",
    "gen_throughput": "The generation throughput (token/s).",
    "cache_hit_rate": "The prefix cache hit rate.",
    "max_total_num_tokens": "Maximum total number of tokens in the KV cache pool.",
    "num_retracted_reqs": "The number of retracted requests.",
    "utilization": "The utilization.",
    "num_grammar_queue_reqs": "The number of requests in the grammar waiting queue.",
    "spec_accept_length": "The average acceptance length of speculative decoding.",
}


class _SchedulerGauges(Collector):
    """Reads the scheduler gauges from a supplier at scrape time."""

    def __init__(self, labels: Mapping[str, str], supplier: Callable[[], Mapping[str, float]]) -> None:
        self._names = list(labels)
        self._values = list(labels.values())
        self._supplier = supplier

    def collect(self) -> Iterator[GaugeMetricFamily]:
        values = self._supplier()
        for name, doc in SCHEDULER_GAUGES.items():
            family = GaugeMetricFamily(f"sglang:{name}", doc, labels=self._names)
            family.add_metric(self._values, float(values.get(name, 0.0)))
            yield family


class EmulatorMetrics:
    """Everything `/metrics` exposes for one emulated server."""

    def __init__(self, model_name: str, scheduler_values: Callable[[], Mapping[str, float]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"model_name": model_name}
        names = list(labels)
        r = self.registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"sglang:{name}", doc, labelnames=names, registry=r).labels(**labels)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"sglang:{name}", doc, labelnames=names, buckets=buckets, registry=r).labels(**labels)

        self.prompt_tokens = counter("prompt_tokens_total", "Number of prefill tokens processed.")
        self.generation_tokens = counter("generation_tokens_total", "Number of generation tokens processed.")
        self.cached_tokens = counter("cached_tokens_total", "Number of cached prompt tokens.")
        self.num_requests = counter("num_requests_total", "Number of requests processed.")
        self.num_aborted = counter("num_aborted_requests_total", "Number of requests aborted.")
        self.ttft = histogram("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                              TTFT_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                             ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "Histogram of End-to-end request latency in seconds",
                             E2E_BUCKETS)
        scheduler_labels = {"model_name": model_name, "engine_type": "unified", "tp_rank": "0", "pp_rank": "0"}
        r.register(_SchedulerGauges(scheduler_labels, scheduler_values))

    def on_first_token(self, ttft_s: float) -> None:
        """A request's first token reached the client side."""
        self.ttft.observe(ttft_s)

    def on_decode(self, interval_s: float, new_tokens: int) -> None:
        """`new_tokens` more tokens arrived `interval_s` after the previous ones."""
        per_token = interval_s / new_tokens
        for _ in range(new_tokens):
            self.itl.observe(per_token)

    def on_finish(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int, e2e_s: float) -> None:
        """A request finished normally."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(completion_tokens)
        self.cached_tokens.inc(cached_tokens)
        self.num_requests.inc()
        self.e2e.observe(e2e_s)

    def on_abort(self) -> None:
        """A request was aborted (client gone, /abort_request, or rejected by a full queue)."""
        self.num_aborted.inc()

    def exposition(self) -> bytes:
        """The registry in Prometheus text format."""
        return generate_latest(self.registry)
