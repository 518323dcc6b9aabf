"""The worker's own bookkeeping: in-flight count, pending prefill tokens, TTFT moving average."""

from __future__ import annotations

import pytest

from lodestar.schemas import InferenceRequest, RoutedRequest, RoutingDecision
from lodestar.worker_averages import OUTPUT_ALPHA, TTFT_ALPHA
from workers.live_state import LiveState, estimate_uncached_tokens
from workers.sglang_client import EngineLoad


def routed(features: dict[str, float] | None = None, matched: int = 0, **req) -> RoutedRequest:
    return RoutedRequest(
        request=InferenceRequest(**req),
        decision=RoutingDecision(worker_id="w1", policy="test", features=features or {}, matched_prefix_tokens=matched),
    )


def test_uncached_estimate_prefers_the_routers_own_number():
    assert estimate_uncached_tokens(routed({"uncached_tokens": 37.0}, prompt="x" * 400)) == 37
    assert estimate_uncached_tokens(routed(matched=16, input_ids=list(range(50)))) == 34
    assert estimate_uncached_tokens(routed(prompt="y" * 41)) == 11
    assert estimate_uncached_tokens(routed(matched=99, input_ids=[1, 2])) == 0


def test_pending_prefill_counts_requests_until_their_first_token():
    s = LiveState("w1", "H100", "lodestar.worker.w1")
    s.started("a", 100)
    s.started("b", 50)
    assert (s.inflight, s.pending_prefill_tokens) == (2, 150)
    s.first_token("a")
    assert (s.inflight, s.pending_prefill_tokens) == (2, 50)
    s.finished("a", 80.0)
    s.finished("b", None)  # failed before its first token
    assert (s.inflight, s.pending_prefill_tokens) == (0, 0)


def test_recent_ttft_is_an_ewma_of_observed_ttfts():
    s = LiveState("w1", "H100", "t")
    s.started("a", 1)
    s.finished("a", 100.0)
    assert s.recent_ttft_ms == 100.0
    s.started("b", 1)
    s.finished("b", 200.0)
    assert s.recent_ttft_ms == pytest.approx(100.0 + TTFT_ALPHA * 100.0)
    s.started("c", 1)
    s.finished("c", None)
    assert s.recent_ttft_ms == pytest.approx(100.0 + TTFT_ALPHA * 100.0)


def test_recent_output_is_an_ewma_of_completions_and_is_advertised():
    s = LiveState("w1", "H100", "t")
    s.started("a", 1)
    s.finished("a", 50.0, 200)
    assert s.recent_output_tokens == 200.0
    s.started("b", 1)
    s.finished("b", 50.0, 400)
    assert s.recent_output_tokens == pytest.approx(200.0 + OUTPUT_ALPHA * 200.0)
    for rid, tokens in (("c", None), ("d", 0)):  # failed before its first token, or nothing written: no sample
        s.started(rid, 1)
        s.finished(rid, None, tokens)
    assert s.snapshot().recent_output_tokens == pytest.approx(200.0 + OUTPUT_ALPHA * 200.0)


def test_snapshot_combines_engine_load_and_own_counts():
    s = LiveState("w1", "A100", "lodestar.worker.w1")
    s.engine = EngineLoad(running=3, waiting=2, kv_usage=0.4, max_kv_tokens=5000, source="/v1/loads")
    s.started("a", 64)
    s.draining = True
    st = s.snapshot()
    assert (st.worker_id, st.gpu_type, st.topic) == ("w1", "A100", "lodestar.worker.w1")
    assert (st.running, st.waiting, st.inflight, st.pending_prefill_tokens) == (3, 2, 1, 64)
    assert (st.kv_usage, st.max_kv_tokens, st.draining) == (0.4, 5000, True)
    assert st.to_redis()["draining"] == "1"
