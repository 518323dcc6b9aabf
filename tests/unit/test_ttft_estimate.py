"""The analytic TTFT estimate (lodestar.ttft_estimate) against the engine model it is derived from."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from engine_driver import make_request
from policy_views import cluster

from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.ttft_estimate import estimate_ttft_ms, estimate_with_cost_terms_ms, gpu_coefficients, own_prefill_ms
from sim.engine import Engine, EngineRequest
from sim.oracle import first_token_at

ROOT = Path(__file__).resolve().parents[2]


def engine_view(engines: list[Engine], matched: list[float]) -> ClusterView:
    """What a router sees of these engines right now (fresh snapshot, no staleness)."""
    loads = [e.load() for e in engines]
    return ClusterView(
        worker_ids=[f"w{i}" for i in range(len(engines))],
        gpu_types=[e.gpu_type for e in engines],
        running=np.array([x.running for x in loads], dtype=np.float64),
        waiting=np.array([x.waiting for x in loads], dtype=np.float64),
        inflight=np.array([x.running + x.waiting for x in loads], dtype=np.float64),
        pending_prefill_tokens=np.array([x.pending_prefill_tokens for x in loads], dtype=np.float64),
        kv_usage=np.array([x.token_usage for x in loads]),
        max_kv_tokens=np.array([e.max_kv_tokens for e in engines], dtype=np.float64),
        recent_ttft_ms=np.zeros(len(engines)),
        matched_prefix_tokens=np.array(matched, dtype=np.float64),
    )


def true_ttft_ms(engine: Engine, req: EngineRequest, now: float) -> float:
    return (first_token_at(engine, req, now) - now) * 1000.0


def test_committed_coefficients_match_the_engine_model() -> None:
    """lodestar/engine_coefficients.json is what scripts/export_engine_coefficients.py derives from sim/engine."""
    done = subprocess.run([sys.executable, "scripts/export_engine_coefficients.py", "--check"], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # and the coefficients are the engine's own numbers
    perf = Engine("L40S").perf.coef
    c = gpu_coefficients("L40S")
    assert c["gemm_flop_s"] == pytest.approx(perf.gemm_flop_s, rel=1e-12)
    assert c["dec_ctx_s"] == pytest.approx(perf.dec_ctx_s, rel=1e-12)
    assert c["chunked_prefill_size"] == Engine("L40S").chunk_size


@pytest.mark.parametrize("gpu", ["H100", "A100", "L40S", "L4", "A10G", "A30", "V100"])
@pytest.mark.parametrize("prompt", [64, 1000, 4000, 12000])
def test_idle_engine_within_3_percent(gpu: str, prompt: int) -> None:
    engine = Engine(gpu)
    est = estimate_ttft_ms(RequestInfo("x", prompt), engine_view([engine], [0.0]))[0]
    assert est == pytest.approx(true_ttft_ms(engine, make_request("x", prompt), 0.0), rel=0.03)


def test_cached_prefix_counts_only_the_uncached_tail() -> None:
    """A 1,900-token cached prefix: the estimate is the engine's TTFT for a 100-token extend on it."""
    engine = Engine("A100")
    first = make_request("a", 2000, prefix_id=7, shared_blocks=120)
    engine.add(first, 0.0)
    t = 0.0
    while engine.has_work():
        t += engine.step(t).duration_s
    second = make_request("b", 2000, arrival_s=t, prefix_id=7, shared_blocks=120)
    est = estimate_ttft_ms(RequestInfo("b", 2000), engine_view([engine], [1920.0]))[0]
    true = true_ttft_ms(engine, second, t)
    assert est == pytest.approx(true, rel=0.05)
    assert est < 0.5 * estimate_ttft_ms(RequestInfo("b", 2000), engine_view([engine], [0.0]))[0]


def arrival_mid_step(engine: Engine, prompt: int, matched: float = 0.0) -> tuple[float, float]:
    """(estimate, true TTFT) in ms of a request arriving halfway through the engine's next step, as the
    simulator's router sees it then (an engine's state advances when its step starts)."""
    step = engine.step(0.0).duration_s
    arrival = step / 2
    est = estimate_ttft_ms(RequestInfo("x", prompt), engine_view([engine], [matched]))[0]
    true = (first_token_at(engine, make_request("x", prompt, arrival_s=arrival), step) - arrival) * 1000.0
    return est, true


@pytest.mark.parametrize("gpu", ["H100", "L40S", "A30"])
def test_queued_backlog(gpu: str) -> None:
    """Requests queued behind a prefill in progress: the estimate follows the engine's chunked prefill (median
    within 15%). Its blind spot: a prefill step that took the whole queue is invisible in the engine's load
    (no pending tokens left), so a request arriving during it is under-estimated (down to ~0.55x here)."""
    rng = np.random.default_rng(3)
    ratios = []
    for trial in range(8):
        engine = Engine(gpu)
        for j in range(int(rng.integers(2, 12))):
            engine.add(make_request(f"q{trial}-{j}", int(rng.integers(300, 6000)), max_new_tokens=64), 0.0)
        est, true = arrival_mid_step(engine, int(rng.integers(200, 5000)))
        ratios.append(est / true)
    ratios = np.array(ratios)
    assert abs(np.median(ratios) - 1.0) < 0.15, ratios
    assert np.all((ratios > 0.5) & (ratios < 1.3)), ratios


def test_decode_step_in_progress_is_waited_for() -> None:
    """A short request arriving during a decode step of a big batch waits for the rest of that step."""
    engine = Engine("L40S")
    for j in range(32):
        engine.add(make_request(f"d{j}", 1500, max_new_tokens=400), 0.0)
    t = 0.0
    while engine.load().waiting or engine.load().pending_prefill_tokens:
        t += engine.step(t).duration_s
    idle = estimate_ttft_ms(RequestInfo("x", 100), engine_view([Engine("L40S")], [0.0]))[0]
    est, true = arrival_mid_step(engine, 100)
    assert est > idle * 1.2
    assert est == pytest.approx(true, rel=0.05)


def shared_prefix_batch(gpu: str, n: int) -> Engine:
    """An engine decoding `n` requests that share one 1,600-token system prompt (little KV for long contexts)."""
    engine = Engine(gpu)
    for j in range(n):
        engine.add(make_request(f"s{j}", 1700, max_new_tokens=400, prefix_id=5, shared_blocks=100), 0.0)
    t = 0.0
    while engine.load().waiting or engine.load().pending_prefill_tokens:
        t += engine.step(t).duration_s
    return engine


@pytest.mark.parametrize("gpu", ["L40S", "H100"])
def test_a_decode_step_reads_every_sequences_shared_prefix(gpu: str) -> None:
    """A decode batch sharing one system prompt uses little KV but reads the prompt once per sequence: a short
    request arriving mid-step waits for that step, which the estimate follows (the KV usage alone, ~0.1 of a
    big pool, would put the step at half its length)."""
    engine = shared_prefix_batch(gpu, 64)
    assert engine.load().token_usage < 0.2
    step = engine.step(0.0).duration_s
    arrival = step / 2
    est = estimate_ttft_ms(RequestInfo("x", 1700), engine_view([engine], [1600.0]))[0]
    late = make_request("x", 1700, arrival_s=arrival, prefix_id=5, shared_blocks=100)
    true = (first_token_at(engine, late, step) - arrival) * 1000.0
    assert est == pytest.approx(true, rel=0.15)


def test_the_cost_terms_carry_the_iteration_in_progress() -> None:
    """The iteration the estimate waits half of: none on an idle worker, the decode step of a running batch, and
    with a backlog queued at least that step (the backlog may be waiting for it to end)."""
    req = RequestInfo("x", 500)
    idle = estimate_with_cost_terms_ms(req, cluster(1, max_kv_tokens=[185_000]))[1]
    decoding = estimate_with_cost_terms_ms(req, cluster(1, running=[40], inflight=[40],
                                                       max_kv_tokens=[185_000]))[1]
    backlog = estimate_with_cost_terms_ms(req, cluster(1, running=[40], inflight=[41], waiting=[1],
                                                      pending_prefill_tokens=[200], max_kv_tokens=[185_000]))[1]
    assert idle is not None and decoding is not None and backlog is not None
    assert idle.iteration_ms[0] == 0.0
    assert decoding.iteration_ms[0] > 10.0
    assert backlog.iteration_ms[0] >= decoding.iteration_ms[0]


def test_orders_workers_like_the_engines() -> None:
    """Across GPU types and loads, the estimate ranks candidates as their true TTFTs do."""
    rng = np.random.default_rng(11)
    engines = [Engine(g) for g in ("H100", "A100", "L4", "A10G", "L40S", "A30")]
    for i, e in enumerate(engines):
        for j in range(int(rng.integers(0, 5))):
            e.add(make_request(f"w{i}-{j}", int(rng.integers(500, 4000))), 0.0)
    prompt = 3000
    est = estimate_ttft_ms(RequestInfo("x", prompt), engine_view(engines, [0.0] * len(engines)))
    true = np.array([true_ttft_ms(e, make_request("x", prompt), 0.0) for e in engines])
    assert int(np.argmin(est)) == int(np.argmin(true))
    assert np.corrcoef(np.log(est), np.log(true))[0, 1] > 0.95


def test_unknown_gpu_falls_back_to_the_reference_gpu() -> None:
    view = cluster(2, gpu_types=["A100", "TPU-v9"])
    est = estimate_ttft_ms(RequestInfo("x", 2000), view)
    assert np.isfinite(est).all()
    assert est[0] == pytest.approx(est[1])


def test_own_prefill_is_the_estimate_on_an_idle_worker() -> None:
    """own_prefill_ms is the request's own part of the estimate: equal to it with nothing running or queued
    (matched or not, at any KV usage: the same stale-match risk), below it on a busy worker."""
    req = RequestInfo("x", 3000)
    for matched, usage in (([0.0, 0.0, 0.0], [0.0, 0.5, 0.9]), ([0.0, 1024.0, 2048.0], [0.2, 0.6, 0.95])):
        idle = cluster(3, gpu_types=["H100", "A30", "L4"], matched=matched, kv_usage=usage,
                       max_kv_tokens=[400_000, 37_800, 25_000])
        assert np.allclose(own_prefill_ms(req, idle), estimate_ttft_ms(req, idle), rtol=1e-12)
    busy = cluster(3, gpu_types=["H100", "A30", "L4"], running=[8, 8, 8], waiting=[2, 2, 2],
                   pending_prefill_tokens=[4000, 4000, 4000], max_kv_tokens=[400_000, 37_800, 25_000])
    assert (own_prefill_ms(req, busy) < estimate_ttft_ms(req, busy)).all()
    both = estimate_with_cost_terms_ms(req, busy)  # one pass, the same numbers
    assert np.array_equal(both[0], estimate_ttft_ms(req, busy)) and both[1] is not None
    assert np.allclose(both[1].own_prefill_ms, own_prefill_ms(req, busy), rtol=1e-12)
    cached = cluster(1, matched=[2048.0], max_kv_tokens=[400_000])
    assert own_prefill_ms(req, cached)[0] < 0.5 * own_prefill_ms(req, cluster(1, max_kv_tokens=[400_000]))[0]


def test_the_kv_wait_reads_the_outputs_the_worker_is_writing() -> None:
    """On a worker whose KV is full of requests writing long outputs, a request asking for a short one still
    waits for theirs: with the worker's recent output length (`recent_output_tokens`) the estimate comes
    closer to the engine's TTFT than with the request's own `max_new_tokens` standing for every output (the
    estimate before workers advertised it, and still where none has finished)."""
    engine = Engine("A10G")
    for j in range(20):
        engine.add(make_request(f"long{j}", 1800, max_new_tokens=300), 0.0)
    t = 0.0
    for _ in range(60):  # past the first prefills: a full decode batch, the rest queued for memory
        t += engine.step(t).duration_s
    load = engine.load()
    assert load.waiting > 0 and load.token_usage > 0.8
    request = RequestInfo("short", 800, max_new_tokens=16)
    true = true_ttft_ms(engine, make_request("short", 800, max_new_tokens=16), t)
    view = engine_view([engine], [0.0])
    own_only = estimate_ttft_ms(request, view)[0]
    view.recent_output_tokens = np.array([300.0])
    with_recent = estimate_ttft_ms(request, view)[0]
    view.recent_output_tokens = np.array([16.0])
    assert estimate_ttft_ms(request, view)[0] == pytest.approx(own_only)  # the same length: the same estimate
    assert abs(np.log(with_recent / true)) < abs(np.log(own_only / true)), (own_only, with_recent, true)
    assert 0.5 < with_recent / true < 2.0, (with_recent, true)
