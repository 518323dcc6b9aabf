"""`lodestar emulator`: serve the calibrated engine model behind SGLang's HTTP API."""

from __future__ import annotations

import typer

from lodestar.logs import setup_logging
from lodestar.settings import load_settings


def emulator(
    gpu: str = typer.Option("H100", help="GPU type the engine model emulates (H100, A100, L40S, L4, A10G, ...)."),
    model: str = typer.Option("llama-3.1-8b", help="Model the engine model emulates (llama-3.1-8b, qwen2.5-7b)."),
    port: int = typer.Option(30000, help="Port to listen on (SGLang's default is 30000)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    time_scale: float = typer.Option(
        1.0, min=0.001,
        help="Wall seconds per emulated second: 2.0 makes every engine step take twice its modelled time "
             "(use on a slow host), 0.5 half. Latencies clients see are wall-clock; divide by this to get "
             "modelled GPU time.",
    ),
    max_queued_requests: int | None = typer.Option(
        None, min=1, help="Reject new requests with 503 once this many wait (SGLang --max-queued-requests)."),
    max_running_requests: int | None = typer.Option(
        None, min=1, help="Cap on the running batch (default: derived from KV capacity, as SGLang does)."),
    seed: int = typer.Option(0, help="Seed of the engine model and of the synthetic logprobs."),
    block_tokens: int = typer.Option(
        1, "--page-size", "--block-tokens", min=1,
        help="Prefix-cache page size in tokens (SGLang --page-size; 1, SGLang's default, caches any prefix)."),
    context_length: int | None = typer.Option(
        None, min=2, help="Longest prompt + completion (SGLang --context-length; default: the model's)."),
    chunked_prefill_size: int | None = typer.Option(
        None, help="Prefill chunk in tokens, <= 0 disables chunking (default: SGLang's for the GPU)."),
    decode_log_interval: int = typer.Option(
        40, min=1, help="Decode iterations between 'Decode batch' log lines and gen_throughput updates."),
    api_key: str | None = typer.Option(
        None, envvar="LODESTAR_EMULATOR_API_KEY",
        help="Require 'Authorization: Bearer KEY' on every route but /health* and /metrics (SGLang --api-key); "
             "the environment variable keeps it off the command line."),
    max_payload_size: int = typer.Option(
        64 * 1024 * 1024, min=1, help="Largest request body in bytes; larger ones get 413."),
    served_model_name: str | None = typer.Option(None, help="Model name to report (default: the HF path)."),
    log_level: str = typer.Option("info", help="Log level of the server (uvicorn) and of the emulator's own lines."),
) -> None:
    """Run an SGLang-compatible server whose timing comes from the calibrated engine model.

    The emulator's own log lines follow the telemetry settings (JSON by default); it creates no spans,
    it stands for the engine, and serves its SGLang-style metrics at /metrics."""
    from sim.emulator.emulator import EmulatorConfig
    from sim.emulator.server import serve

    telemetry = load_settings().telemetry
    setup_logging("emulator", telemetry.model_copy(update={"log_level": log_level}))
    config = EmulatorConfig(
        gpu=gpu, model=model, host=host, port=port, time_scale=time_scale,
        max_queued_requests=max_queued_requests, max_running_requests=max_running_requests, seed=seed,
        block_tokens=block_tokens, served_model_name=served_model_name, context_length=context_length,
        chunked_prefill_size=chunked_prefill_size, decode_log_interval=decode_log_interval, api_key=api_key or None,
        max_payload_size=max_payload_size,
    )
    serve(config, log_level=log_level)
