"""Benchmark the SGLang-API emulator: fidelity per GPU, and how much load one emulator process sustains.

    .venv/bin/python scripts/bench_emulator.py [--gpus H100,A100,...] [--lengths 1024,4096,16384]
        [--rates 2,4,6,8,10,12,14,16] [--level-requests 40] [--capacity-time-scale 1]
        [--skip-fidelity] [--skip-capacity]

Each emulator runs as its own process (`python -m app.cli emulator`), driven over loopback HTTP by a
minimal asyncio client (one connection per request, streaming `/generate` with `input_ids`).

1. Fidelity: for every GPU and prompt length, requests one at a time on an idle emulator (time scale 1,
   fresh random prompts so nothing is cached); the median TTFT and TPOT the client measures beside
   what the engine model predicts for the same request in virtual time.
2. Capacity (H100, time scale 1): Poisson arrivals at increasing rates; by default unique 2048-token
   prompts (idle TTFT ~55 ms, so a millisecond of HTTP overhead is ~2%) and 256 output tokens, so
   that the stream of chunks grows large before the modelled GPU saturates. The arrival times the
   client used are replayed through a fresh engine in virtual time; the TTFT shift is measured mean
   TTFT / predicted mean TTFT - 1, and the emulator "sustains" a rate while the shift stays within 5%.
   "server shift" is the same from the emulator's own TTFT histogram (receipt to delivery), which leaves
   out the client and the loopback hops.
   The emulator process's CPU time per streamed chunk is printed too: on a busy shared host it is a
   steadier figure than latency. `--capacity-time-scale X` runs the emulator X times slower than the
   modelled GPU (rates and TTFTs are then per emulated second), the remedy for a host that cannot keep up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from lodestar.hashing import token_block_hashes
from sim.emulator.emulator import EmulatorConfig
from sim.engine import Engine, EngineRequest

ROOT = Path(__file__).resolve().parent.parent
BLOCK_TOKENS = EmulatorConfig().block_tokens  # the emulator's default page size, for the engine replay
VOCAB = 120_000
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- the emulator process --------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class EmulatorProcess:
    """`lodestar emulator` in a child process."""

    def __init__(self, gpu: str, time_scale: float = 1.0) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "emulator", "--gpu", gpu, "--port", str(self.port),
             "--time-scale", str(time_scale), "--log-level", "warning"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )

    async def ready(self) -> None:
        for _ in range(300):
            try:
                status, _ = await http_get("127.0.0.1", self.port, "/health")
                if status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"emulator exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            await asyncio.sleep(0.1)
        raise RuntimeError("emulator did not become healthy")

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---- a minimal HTTP/1.1 client ---------------------------------------------------------------

async def http_get(host: str, port: int, path: str) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@dataclass
class StreamResult:
    sent: float
    first: float
    last: float
    chunks: int  # data events carrying tokens
    completion_tokens: int


async def stream_generate(host: str, port: int, body: bytes) -> StreamResult:
    """POST a streaming /generate body; time the first and last token events."""
    reader, writer = await asyncio.open_connection(host, port)
    head = (f"POST /generate HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    sent = time.perf_counter()
    writer.write(head + body)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"HTTP status {status!r}")
    while (await reader.readline()) not in (b"\r\n", b""):
        pass  # headers (uvicorn streams with chunked transfer encoding)
    first = last = 0.0
    chunks = 0
    last_data = b"{}"
    buf = b""
    done = False
    while not done:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        buf += (await reader.readexactly(size + 2))[:-2]
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            data = event[len(b"data: "):]
            if data == b"[DONE]":
                done = True
                break
            now = time.perf_counter()
            if not first:
                first = now
            last = now
            chunks += 1
            last_data = data
    writer.close()
    meta = json.loads(last_data).get("meta_info", {})
    return StreamResult(sent, first, last, chunks, int(meta.get("completion_tokens", 0)))


def generate_body(rid: str | None, ids: list[int], out_tokens: int) -> bytes:
    """A streaming /generate request body."""
    body = {"input_ids": ids, "stream": True, "sampling_params": {"max_new_tokens": out_tokens}}
    return json.dumps({**body, "rid": rid} if rid else body).encode()


async def server_ttft(port: int) -> tuple[float, float]:
    """The emulator's own TTFT histogram (sum, count), measured from request receipt to token delivery."""
    _, body = await http_get("127.0.0.1", port, "/metrics")
    values = {s.name: s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples}
    return (values.get("sglang:time_to_first_token_seconds_sum", 0.0),
            values.get("sglang:time_to_first_token_seconds_count", 0.0))


# ---- the engine model's prediction ------------------------------------------------------------

@dataclass
class Arrival:
    rid: str
    at: float
    ids: list[int]
    max_new: int


def replay(gpu: str, arrivals: list[Arrival]) -> dict[str, tuple[float, float]]:
    """(TTFT, TPOT) per request from a fresh engine fed the same arrivals in virtual time, stepped the
    way the emulator's runner steps it."""
    engine = Engine(gpu)
    pending = sorted(arrivals, key=lambda a: a.at)
    by_rid = {a.rid: a for a in arrivals}
    first: dict[str, float] = {}
    out: dict[str, tuple[float, float]] = {}
    t, i = 0.0, 0
    while i < len(pending) or engine.has_work():
        if not engine.has_work():
            t = max(t, pending[i].at)
        while i < len(pending) and pending[i].at <= t:
            a = pending[i]
            engine.add(EngineRequest(a.rid, len(a.ids), tuple(token_block_hashes(a.ids, BLOCK_TOKENS)),
                                     BLOCK_TOKENS, a.max_new, a.at), a.at)
            i += 1
        step = engine.step(t)
        t += step.duration_s
        for ft in step.first_tokens:
            first.setdefault(ft.rid, t)
        for fin in step.finished:
            a = by_rid[fin.rid]
            ttft = first[fin.rid] - a.at
            out[fin.rid] = (ttft, (t - first[fin.rid]) / max(fin.completion_tokens - 1, 1))
    return out


# ---- 1. fidelity -----------------------------------------------------------------------------

async def fidelity(gpus: list[str], lengths: list[int], out_tokens: int, repeats: int) -> None:
    print(f"\nIdle single request, time scale 1, {out_tokens} output tokens, median of {repeats}: emulated "
          f"(client-measured) vs engine model; load average {os.getloadavg()[0]:.1f}")
    print(f"{'GPU':6s} {'prompt':>7s} {'TTFT ms':>9s} {'model':>9s} {'err':>7s} {'TPOT ms':>9s} {'model':>8s} "
          f"{'err':>7s}")
    rng = random.Random(1)
    for gpu in gpus:
        emu = EmulatorProcess(gpu)
        try:
            await emu.ready()
            for n in lengths:
                ttfts, tpots = [], []
                for _ in range(repeats):
                    ids = [rng.randrange(VOCAB) for _ in range(n)]  # fresh: nothing cached
                    res = await stream_generate("127.0.0.1", emu.port, generate_body(None, ids, out_tokens))
                    ttfts.append(res.first - res.sent)
                    tpots.append((res.last - res.first) / max(res.completion_tokens - 1, 1))
                ttft, tpot = statistics.median(ttfts), statistics.median(tpots)
                p_ttft, p_tpot = replay(gpu, [Arrival("r", 0.0, ids, out_tokens)])["r"]
                print(f"{gpu:6s} {n:7d} {ttft * 1e3:9.1f} {p_ttft * 1e3:9.1f} {100 * (ttft / p_ttft - 1):+6.1f}% "
                      f"{tpot * 1e3:9.2f} {p_tpot * 1e3:8.2f} {100 * (tpot / p_tpot - 1):+6.1f}%", flush=True)
        finally:
            emu.close()


# ---- 2. capacity -----------------------------------------------------------------------------

async def capacity_level(emu: EmulatorProcess, rate: float, n_requests: int, shared: list[int], rng: random.Random,
                         unique: int, out_tokens: int, tag: str, time_scale: float) -> dict[str, float]:
    """One level: `n_requests` Poisson arrivals at `rate` per emulated second."""
    tasks: list[asyncio.Task[StreamResult]] = []
    arrivals: list[Arrival] = []
    schedule: list[float] = []  # wall offsets of the arrivals, and the requests, prepared beforehand
    next_at = 0.0
    for _ in range(n_requests):
        schedule.append(next_at)
        next_at += rng.expovariate(rate) * time_scale
    prompts = [shared + [rng.randrange(VOCAB) for _ in range(unique)] for _ in schedule]
    bodies = [generate_body(f"{tag}-{k}", ids, out_tokens) for k, ids in enumerate(prompts)]
    ttft_sum0, ttft_n0 = await server_ttft(emu.port)
    t0 = time.perf_counter()
    cpu0 = emu.cpu_seconds()
    for k, at in enumerate(schedule):
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        arrivals.append(Arrival(f"{tag}-{k}", (time.perf_counter() - t0) / time_scale, prompts[k], out_tokens))
        tasks.append(asyncio.create_task(stream_generate("127.0.0.1", emu.port, bodies[k])))
    results = await asyncio.gather(*tasks)
    wall = time.perf_counter() - t0
    cpu = emu.cpu_seconds() - cpu0
    ttft_sum1, ttft_n1 = await server_ttft(emu.port)
    server_mean = (ttft_sum1 - ttft_sum0) / max(ttft_n1 - ttft_n0, 1) / time_scale
    _, info = await http_get("127.0.0.1", emu.port, "/server_info")
    max_lag = json.loads(info)["emulator"]["max_lag_s"] * time_scale  # wall seconds, since start
    measured = [(r.first - r.sent) / time_scale for r in results]
    predicted = replay("H100", arrivals)
    pred = [predicted[a.rid][0] for a in arrivals]
    warm = slice(1, None) if shared else slice(None)  # the first request of a level fills the shared prefix
    m_mean, p_mean = statistics.fmean(measured[warm]), statistics.fmean(pred[warm])
    shifts = sorted(m - p for m, p in zip(measured[warm], pred[warm], strict=True))
    relative = [m / p - 1 for m, p in zip(measured[warm], pred[warm], strict=True)]
    chunks = sum(r.chunks for r in results)
    return {
        "rate": rate, "req_s": len(results) / wall, "chunks_s": chunks / wall,
        "ttft_ms": m_mean * 1e3, "pred_ms": p_mean * 1e3, "shift": m_mean / p_mean - 1,
        "median_shift": statistics.median(relative),
        "server_shift": server_mean / statistics.fmean(pred) - 1,
        "p90_shift_ms": shifts[int(0.9 * (len(shifts) - 1))] * 1e3, "cpu": cpu / wall,
        "cpu_us_chunk": cpu / chunks * 1e6, "max_lag_ms": max_lag * 1e3,
    }


async def capacity(rates: list[float], n_requests: int, shared_tokens: int, unique: int, out_tokens: int,
                   time_scale: float) -> None:
    print(f"\nCapacity, H100, time scale {time_scale:g}: Poisson arrivals, prompt = {shared_tokens} shared + {unique} "
          f"unique tokens, {out_tokens} output tokens, {n_requests} requests per level; load average "
          f"{os.getloadavg()[0]:.1f}. rate: per emulated second; req/s, chunks/s: per wall second; TTFT: emulated")
    print(f"{'rate':>6s} {'req/s':>7s} {'chunks/s':>9s} {'TTFT ms':>8s} {'model':>7s} {'shift':>7s} {'median':>7s} "
          f"{'p90 shift ms':>12s} {'server shift':>12s} {'emulator CPU':>12s} {'CPU us/chunk':>12s} "
          f"{'max lag ms':>10s}")
    rng = random.Random(2)
    emu = EmulatorProcess("H100", time_scale)
    rows: list[dict[str, float]] = []
    try:
        await emu.ready()
        for level, rate in enumerate(rates):
            shared = [rng.randrange(VOCAB) for _ in range(shared_tokens)]  # fresh per level
            row = await capacity_level(emu, rate, n_requests, shared, rng, unique, out_tokens, f"L{level}",
                                       time_scale)
            rows.append(row)
            print(f"{row['rate']:6.0f} {row['req_s']:7.1f} {row['chunks_s']:9.0f} {row['ttft_ms']:8.1f} "
                  f"{row['pred_ms']:7.1f} {100 * row['shift']:+6.1f}% {100 * row['median_shift']:+6.1f}% "
                  f"{row['p90_shift_ms']:12.1f} "
                  f"{100 * row['server_shift']:+11.1f}% "
                  f"{100 * row['cpu']:11.0f}% {row['cpu_us_chunk']:12.0f} {row['max_lag_ms']:10.1f}", flush=True)
    finally:
        emu.close()
    passing = rows[: next((i for i, r in enumerate(rows) if r["shift"] > 0.05), len(rows))]
    sustained = passing[-1] if passing else None
    if sustained:
        print(f"\nSustained with the mean TTFT within 5% (at this and every lower rate): rate {sustained['rate']:g}, "
              f"{sustained['req_s']:.1f} req/s, "
              f"{sustained['chunks_s']:.0f} streamed chunks/s")
    else:
        print("\nEven the lowest rate shifts the mean TTFT by more than 5%")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default="H100,A100,L40S,L4,A10G,A30,V100")
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--out-tokens", type=int, default=33)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rates", default="2,4,6,8,10,12,14,16")
    ap.add_argument("--level-requests", type=int, default=40)
    ap.add_argument("--shared-tokens", type=int, default=0)
    ap.add_argument("--unique-tokens", type=int, default=2048)
    ap.add_argument("--capacity-out-tokens", type=int, default=256)
    ap.add_argument("--capacity-time-scale", type=float, default=1.0)
    ap.add_argument("--skip-fidelity", action="store_true")
    ap.add_argument("--skip-capacity", action="store_true")
    args = ap.parse_args()
    if not args.skip_fidelity:
        asyncio.run(fidelity(args.gpus.split(","), [int(x) for x in args.lengths.split(",")], args.out_tokens,
                             args.repeats))
    if not args.skip_capacity:
        asyncio.run(capacity([float(x) for x in args.rates.split(",")], args.level_requests, args.shared_tokens,
                             args.unique_tokens, args.capacity_out_tokens, args.capacity_time_scale))


if __name__ == "__main__":
    main()
