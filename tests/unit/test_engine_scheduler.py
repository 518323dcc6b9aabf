"""Scheduler invariants of the SGLang engine model."""

from __future__ import annotations

import random

import pytest
from engine_driver import make_request, run

from lodestar.hashing import trace_block_hashes
from sim.engine import Engine, EngineConfig, EngineRequest, QueueFull, RequestTooLarge


def small_engine(**cfg) -> Engine:
    """An L4 whose KV pool is squeezed to a few thousand tokens, so memory pressure is easy to create."""
    e = Engine("L4", config=EngineConfig(**cfg))
    e.max_kv_tokens = 6000
    return e


def kv_invariants(e: Engine) -> None:
    load = e.load()
    assert e._available() >= 0
    assert e.cache.total_tokens + e._private <= e.max_kv_tokens
    assert 0 <= load.used_kv_tokens <= load.max_kv_tokens
    running = list(e.running.values())
    for r in running:
        e._materialize(r)
    assert e._private == sum(r.private for r in running) + (e.chunked.private if e.chunked else 0)
    assert e._running_ctx == sum(r.kv_len for r in running)
    clip = e.cfg.clip_max_new_tokens
    assert e._remaining_new_tokens() == sum(min(r.max_new - r.output, clip) for r in running)
    unlocked = sum(e.cache.node_tokens(n) for n in e.cache._lru)
    assert unlocked == e.cache.evictable_tokens


def random_workload(seed: int, n: int = 120):
    rng = random.Random(seed)
    reqs = []
    t = 0.0
    for i in range(n):
        t += rng.expovariate(40.0)
        prompt = rng.randint(20, 1500)
        reqs.append(make_request(f"r{i}", prompt, t, max_new_tokens=rng.randint(1, 300),
                                 prefix_id=rng.randint(1, 4), shared_blocks=rng.randint(0, 60),
                                 stop_after=rng.choice([None, rng.randint(1, 200)])))
    return reqs


@pytest.mark.parametrize("cfg", [{}, {"enable_mixed_chunk": True, "chunked_prefill_size": 512},
                                 {"schedule_policy": "lpm", "max_running_requests": 16}])
def test_kv_never_over_budget_and_every_request_completes(cfg):
    e = small_engine(**cfg)
    reqs = random_workload(1)
    log = run(e, reqs, check=kv_invariants)
    assert set(log.finished) == {r.rid for r in reqs}
    for r in reqs:
        f = log.finished[r.rid]
        limit = r.max_new_tokens if r.stop_after is None else min(r.stop_after, r.max_new_tokens)
        assert f.completion_tokens == log.tokens[r.rid] == limit
        assert f.reason == ("stop" if r.stop_after is not None and r.stop_after < r.max_new_tokens else "length")
        assert 0 <= f.cached_tokens <= r.prompt_len - 1
    assert e.load().used_kv_tokens == 0
    assert e.cache.protected_tokens == 0


def test_fcfs_first_prefill_order():
    e = Engine("H100", config=EngineConfig(chunked_prefill_size=1024, max_prefill_tokens=2048))
    reqs = [make_request(f"r{i}", 300 + 97 * i, arrival_s=0.0) for i in range(30)]
    log = run(e, reqs)
    assert log.first_order == [r.rid for r in reqs]


def test_cached_tokens_capped_at_prompt_minus_one():
    e = Engine("H100")
    a = make_request("a", 512, 0.0, max_new_tokens=4, prefix_id=7, shared_blocks=32)
    b = make_request("b", 512, 1.0, max_new_tokens=4, prefix_id=7, shared_blocks=32)
    log = run(e, [a, b])
    assert log.cached["a"] == 0
    assert log.cached["b"] == 511


def test_prefix_reuse_lowers_ttft():
    e = Engine("A100")
    a = make_request("a", 4000, 0.0, max_new_tokens=8, prefix_id=3, shared_blocks=250)
    b = make_request("b", 4000, 5.0, max_new_tokens=8, prefix_id=3, shared_blocks=250)
    log = run(e, [a, b])
    assert log.cached["b"] == 3999
    assert log.first_token_s["b"] - 5.0 < 0.2 * (log.first_token_s["a"] - 0.0)


def test_retraction_happens_and_requests_still_complete():
    # new_token_ratio decays during long decodes, admission turns optimistic, and the KV pool runs out
    e = small_engine(chunked_prefill_size=2048)
    rng = random.Random(0)
    reqs = [make_request(f"r{i}", 100, 0.0, max_new_tokens=1500, stop_after=rng.randint(20, 1500))
            for i in range(60)]
    log = run(e, reqs, check=kv_invariants)
    assert log.retracted, "the KV pool is too small for all outputs: SGLang would retract"
    assert e.num_retracted == len(log.retracted)
    for r in reqs:
        assert log.finished[r.rid].completion_tokens == log.tokens[r.rid] == r.stop_after
    assert len(log.first_order) == len(reqs)  # a retracted request does not emit a second first token


def test_fused_decode_matches_single_steps():
    reqs = random_workload(7, n=60)
    single = run(Engine("A10G"), reqs, fuse=False)
    fused = run(Engine("A10G"), reqs, fuse=True)
    assert fused.iterations == single.iterations
    assert fused.steps < single.steps
    assert fused.tokens == single.tokens
    assert {k: f.completion_tokens for k, f in fused.finished.items()} == \
        {k: f.completion_tokens for k, f in single.finished.items()}
    for rid, t in single.finish_s.items():
        assert fused.finish_s[rid] == pytest.approx(t, rel=1e-9, abs=1e-9)
    for rid, t in single.first_token_s.items():
        assert fused.first_token_s[rid] == pytest.approx(t, rel=1e-9, abs=1e-9)


def test_deterministic_by_seed():
    cfg = EngineConfig(step_time_jitter=0.05)
    a = run(Engine("L40S", config=cfg, seed=3), random_workload(2, 40))
    b = run(Engine("L40S", config=cfg, seed=3), random_workload(2, 40))
    c = run(Engine("L40S", config=cfg, seed=4), random_workload(2, 40))
    assert a.finish_s == b.finish_s and a.first_token_s == b.first_token_s
    assert a.finish_s != c.finish_s


def test_clone_is_independent():
    reqs = random_workload(5, 40)
    ref = run(Engine("A30"), reqs)
    e = Engine("A30")
    for r in reqs[:20]:
        e.add(r, 0.0)
    for _ in range(5):
        e.step(0.0)
    before = e.load()
    c = e.clone()
    while c.has_work():
        c.step(0.0, until=float("inf"))
    assert e.load() == before
    assert c.load().running == 0 and before.running > 0
    assert ref.finished  # sanity: the workload is valid
    assert e.cache.total_tokens != c.cache.total_tokens or e.cache.evictable_tokens != c.cache.evictable_tokens


def test_queue_full_and_too_large_and_abort():
    e = Engine("H100", config=EngineConfig(max_queued_requests=2))
    e.add(make_request("a", 100), 0.0)
    e.add(make_request("b", 100), 0.0)
    with pytest.raises(QueueFull):
        e.add(make_request("c", 100), 0.0)
    with pytest.raises(RequestTooLarge):
        Engine("L4").add(make_request("huge", 60_000), 0.0)
    assert e.abort("b") and not e.abort("zzz")
    out = e.step(0.0)
    assert [f.rid for f in out.finished if f.reason == "abort"] == ["b"]
    assert [f.rid for f in out.first_tokens] == ["a"]
    e.step(out.duration_s)
    assert e.abort("a")  # running: its KV is released
    e.step(1.0)
    assert not e.has_work() and e.load().used_kv_tokens == 0
    assert e.flush_cache() and e.cache.total_tokens == 0


def test_slowdown_scales_step_time():
    e1, e2 = Engine("H100"), Engine("H100")
    e2.set_slowdown(2.0)
    for e in (e1, e2):
        e.add(make_request("a", 2000), 0.0)
    assert e2.step(0.0).duration_s == pytest.approx(2 * e1.step(0.0).duration_s)


def test_finished_answer_is_cached_when_its_hashes_are_known():
    """Turn 2 of a chat = turn 1's prompt + answer + a new message: it hits the answer's blocks too."""
    conversation = trace_block_hashes(list(range(1, 101)))  # 100 blocks of 16 tokens
    turn1 = EngineRequest("t1", 800, tuple(conversation[:50]), 16, 320, 0.0,
                          output_block_hashes=tuple(conversation[50:70]))
    turn2 = EngineRequest("t2", 1600, tuple(conversation[:100]), 16, 8, 60.0)
    plain = EngineRequest("t1", 800, tuple(conversation[:50]), 16, 320, 0.0)
    with_answer = run(Engine("H100"), [turn1, turn2])
    without = run(Engine("H100"), [plain, EngineRequest("t2", 1600, tuple(conversation[:100]), 16, 8, 60.0)])
    # the answer's KV covers 800 + 320 - 1 tokens: 69 whole blocks
    assert with_answer.cached["t2"] == 69 * 16
    assert without.cached["t2"] == 50 * 16


def test_lpm_admits_the_longest_cached_prefix_first():
    e = Engine("H100", config=EngineConfig(schedule_policy="lpm", chunked_prefill_size=1024, max_prefill_tokens=1024))
    run(e, [make_request("warm", 960, 0.0, max_new_tokens=1, prefix_id=5, shared_blocks=60)])
    cold = make_request("cold", 960, 1.0, max_new_tokens=1)
    hot = make_request("hot", 960, 1.0, max_new_tokens=1, prefix_id=5, shared_blocks=60)
    log = run(e, [cold, hot])
    assert log.first_order == ["hot", "cold"]
    fcfs = run(Engine("H100", config=EngineConfig(chunked_prefill_size=1024, max_prefill_tokens=1024)), [cold, hot])
    assert fcfs.first_order == ["cold", "hot"]


def test_load_reports_generation_throughput_and_usage():
    e = Engine("A100")
    reqs = [make_request(f"r{i}", 500, 0.0, max_new_tokens=200) for i in range(8)]
    for r in reqs:
        e.add(r, 0.0)
    assert e.load().waiting == 8 and e.load().pending_prefill_tokens == 4000
    now = 0.0
    for _ in range(60):
        out = e.step(now)
        now += out.duration_s
    load = e.load()
    assert load.running == 8 and load.waiting == 0 and load.pending_prefill_tokens == 0
    step = e.perf.decode_time(8, 8 * 560)
    assert load.gen_throughput == pytest.approx(8 / step, rel=0.05)
    assert load.used_kv_tokens == 8 * (500 + 59)  # prompt + one KV token per decode iteration
    assert load.token_usage == pytest.approx(load.used_kv_tokens / e.max_kv_tokens)


def test_prefill_only_request_caches_its_prompt_and_emits_nothing():
    """max_new_tokens 0 (SGLang's scoring and n > 1 prefix-warming requests): one prefill, no token, a
    "length" finish with 0 completion tokens, and the prompt left in the cache for the next request."""
    e = Engine("H100")
    warm = make_request("warm", 1024, 0.0, max_new_tokens=0, prefix_id=9, shared_blocks=64)
    sample = make_request("sample", 1024, 1.0, max_new_tokens=8, prefix_id=9, shared_blocks=64)
    log = run(e, [warm, sample], check=kv_invariants)
    assert "warm" not in log.first_token_s and log.tokens.get("warm", 0) == 0
    assert log.finished["warm"].reason == "length" and log.finished["warm"].completion_tokens == 0
    assert log.finish_s["warm"] > 0.0  # it took a prefill's time
    assert log.cached["sample"] == 1023
    assert e.load().used_kv_tokens == 0
