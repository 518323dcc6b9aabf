"""What tracing costs the dispatcher, in CPU per routed request.

    .venv/bin/python scripts/bench_tracing.py [--micro-requests 32000] [--requests 5000] [--repeat 2]
        [--configs off,disabled,none,console,otlp-up,otlp-down,sampled-10pct] [--no-process]

1. Micro: the dispatcher's per-request tracing calls exactly as `Dispatcher.handle_batch` and
   `route_and_publish` make them (a `route` span from the record's headers, started at consumption time;
   the decision's attributes; the context injected into the routed message's headers; end), in batches of
   64, in a fresh process per configuration. CPU microseconds per request, export work included (the
   batch exporter's thread runs in the same process and is flushed inside the measurement).
2. Process: the production Dispatcher in its own process on the real broker and Redis
   (scripts/bench_dispatcher.py's throughput phase: 8 fake-heartbeated workers, requests pre-produced,
   the settings' default policy) with tracing set up as `lodestar dispatcher` does. The dispatcher
   process's own CPU milliseconds per routed request, best of `--repeat` runs (the host is shared).

Configurations (the standard OTEL_* variables, as an operator would set them):
  off            no SDK provider installed: the OpenTelemetry API's no-op spans (the cost floor)
  disabled       OTEL_SDK_DISABLED=true: the SDK hands out no-op tracers (no trace ids, no propagation)
  none           LODESTAR_TELEMETRY__EXPORTER=none, the default: real spans, nothing exported
  console        every span printed as JSON (to /dev/null here)
  otlp-up        batched OTLP/HTTP to a local sink answering 200 (another process: its CPU is not counted)
  otlp-down      OTLP/HTTP to a closed port (collector down: failed exports, spans dropped once queued)
  sampled-10pct  otlp-up with OTEL_TRACES_SAMPLER=parentbased_traceidratio, OTEL_TRACES_SAMPLER_ARG=0.1
                 (micro: the records carry a client's decision, one in ten sampled, which the dispatcher
                 follows; process: the bench's requests carry no context, so the dispatcher's ratio decides)
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

CONFIGS = ("off", "disabled", "none", "console", "otlp-up", "otlp-down", "sampled-10pct")
BATCH = 64
CONFIG_ENV = "LODESTAR_BENCH_TRACING_CONFIG"

# An OTLP/HTTP sink: answers every POST with 200 and an empty ExportTraceServiceResponse.
SINK = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Sink).serve_forever()
"""


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def otlp_sink() -> Iterator[str]:
    """Run the sink in a subprocess; yields its traces endpoint."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SINK, str(port)])
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError("the OTLP sink did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1/traces"
    finally:
        proc.terminate()
        proc.wait(10)


def config_env(config: str, sink: str) -> dict[str, str]:
    """The OTEL_* variables of a configuration."""
    if config in ("off", "none"):
        return {"OTEL_TRACES_EXPORTER": "none"}
    if config == "disabled":
        return {"OTEL_SDK_DISABLED": "true"}
    if config == "console":
        return {"OTEL_TRACES_EXPORTER": "console"}
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": sink}
    if config == "otlp-down":
        env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = f"http://127.0.0.1:{free_port()}/v1/traces"
    if config == "sampled-10pct":
        env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="0.1")
    return env


def install_tracing(config: str) -> Any:
    """In a child process: the provider `lodestar dispatcher` would install (None for `off`)."""
    from lodestar.settings import Settings
    from lodestar.tracing import setup_tracing

    if config == "off":
        return None
    if config == "console":  # the exporter writes to the stdout of import time: redirect the descriptor
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    return setup_tracing("dispatcher", Settings().telemetry, instance_id="bench")


def exit_now(results: Any) -> None:
    """Deliver what was put on `results`, then exit without waiting for the failing exports (otlp-down)."""
    results.close()
    results.join_thread()
    os._exit(0)


# --------------------------------------------------------------------------- 1. micro


def _micro_child(config: str, env: dict[str, str], n_requests: int, results: Any) -> None:
    """Child: time the per-request tracing calls of the dispatcher under one configuration."""
    os.environ.update(env)
    from aiokafka import ConsumerRecord

    from lodestar import tracing
    from lodestar.schemas import RoutingDecision

    provider = install_tracing(config)
    tracer = tracing.get_tracer("dispatcher")
    rng = __import__("random").Random(0)
    records = []
    for i in range(BATCH):  # each carries a client's trace context, as the client's requests do
        # sampled-10pct: the client's root sampler kept one trace in ten, and the dispatcher follows it
        flags = "00" if config == "sampled-10pct" and i % 10 else "01"
        traceparent = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-{flags}".encode()
        records.append(ConsumerRecord(topic="lodestar.requests", partition=i % 12, offset=i, timestamp=0,
                                      timestamp_type=0, key=f"r{i}".encode(), value=b"{}", checksum=None,
                                      serialized_key_size=3, serialized_value_size=2,
                                      headers=[("traceparent", traceparent)]))
    decision = RoutingDecision(worker_id="w03", policy="learned", model_version=7, predicted_ttft_ms=83.5,
                               explored=False, matched_prefix_tokens=384, dispatcher_id="bench")

    def batch() -> None:
        consumed_ns = time.time_ns()
        spans = [tracing.start_process_span(tracer, tracing.OP_ROUTE, r, request_id=f"r{r.offset}",
                                            group="lodestar-dispatchers", start_time_ns=consumed_ns)
                 for r in records]
        for span in spans:
            tracing.set_decision_attributes(span, decision)
            tracing.headers_for(span)
        for span in spans:
            span.end()

    flushes = provider is not None and config != "otlp-down"  # a flush would wait on the failing exports
    for _ in range(20):  # warm up
        batch()
    if flushes:
        provider.force_flush()
    batches = max(1, n_requests // BATCH)
    cpu0 = time.process_time()
    for _ in range(batches):
        batch()
    if flushes:
        provider.force_flush()  # count the export of what was recorded
    results.put((time.process_time() - cpu0) / (batches * BATCH) * 1e6)
    if config == "otlp-down":
        exit_now(results)


def micro(configs: list[str], n_requests: int, sink: str) -> dict[str, float]:
    """CPU microseconds per request of each configuration, each measured in a fresh process."""
    ctx = mp.get_context("spawn")
    out: dict[str, float] = {}
    for config in configs:
        results = ctx.Queue()
        proc = ctx.Process(target=_micro_child, args=(config, config_env(config, sink), n_requests, results))
        proc.start()
        out[config] = results.get(timeout=300)
        proc.join(30)
        print(f"  {config:>14}: {out[config]:7.1f} us CPU/request", flush=True)
    return out


# --------------------------------------------------------------------------- 2. whole dispatcher process


def _traced_dispatcher_process(settings_json: str, stop: Any, results: Any) -> None:
    """Child: bench_dispatcher's dispatcher process, with tracing installed first (config from the env)."""
    import bench_dispatcher

    provider = install_tracing(os.environ[CONFIG_ENV])
    bench_dispatcher._dispatcher_process(settings_json, stop, results)
    if provider is not None and os.environ[CONFIG_ENV] == "otlp-down":
        exit_now(results)


async def process(configs: list[str], n_requests: int, repeat: int, sink: str) -> dict[str, list[float]]:
    """CPU ms per routed request of the dispatcher process, per configuration and run (interleaved)."""
    import bench_dispatcher

    from lodestar.settings import Settings

    bench_dispatcher._dispatcher_process = _traced_dispatcher_process  # the spawned child runs ours
    policy = Settings().dispatcher.policy
    out: dict[str, list[float]] = {c: [] for c in configs}
    saved = dict(os.environ)
    try:
        for run in range(repeat):
            for config in configs:
                os.environ.clear()
                os.environ.update(saved)
                os.environ.update(config_env(config, sink))
                os.environ[CONFIG_ENV] = config
                print(f"  run {run + 1}/{repeat}: {config} ...", flush=True)
                row = await bench_dispatcher.throughput_phase(8, n_requests, policy, keep=False)
                out[config].append(row["cpu_ms"])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--micro-requests", type=int, default=32000, help="requests per micro measurement")
    parser.add_argument("--requests", type=int, default=5000, help="requests per dispatcher-process run")
    parser.add_argument("--repeat", type=int, default=2, help="dispatcher-process runs per configuration")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    parser.add_argument("--process-configs", default="off,none,otlp-up,otlp-down",
                        help="configurations of the dispatcher-process phase")
    parser.add_argument("--no-process", action="store_true", help="only the micro measurement")
    args = parser.parse_args()
    configs = [c for c in args.configs.split(",") if c]
    process_configs = [c for c in args.process_configs.split(",") if c]
    for c in {*configs, *process_configs} - set(CONFIGS):
        parser.error(f"unknown configuration {c!r}")

    with otlp_sink() as sink:
        print(f"micro: the dispatcher's per-request tracing calls, batches of {BATCH}, "
              f"{args.micro_requests} requests per configuration")
        costs = micro(configs, args.micro_requests, sink)
        if "off" in costs:
            print("  over off: " + ", ".join(f"{c} +{us - costs['off']:.1f} us" for c, us in costs.items()
                                             if c != "off"))
        if args.no_process:
            return
        print(f"\ndispatcher process: bench_dispatcher's throughput phase, 8 workers, {args.requests} requests, "
              f"best of {args.repeat}")
        runs = asyncio.run(process(process_configs, args.requests, args.repeat, sink))
    best = {c: min(v) for c, v in runs.items()}
    base = best.get("off", 0.0)
    for config, ms in best.items():
        print(f"  {config:>14}: {ms:6.3f} ms CPU/request  (+{(ms - base) * 1e3:6.1f} us over off; runs "
              f"{', '.join(f'{v:.3f}' for v in runs[config])})")
    print(f"(host load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
