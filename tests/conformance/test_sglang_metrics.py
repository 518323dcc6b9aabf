"""SGLang's test/srt/test_metrics.py (the 0.5.x version, test_metrics_1gpu), replayed: after a health
generation, a streamed batch of 20 prompts and a repeated prompt, /metrics carries SGLang's series.

Left out: test_metrics_2gpu (tensor and data parallelism, which SGLang's CI skips too), and the series
later SGLang versions added (routing keys, realtime tokens, forward execution seconds, MFU estimates):
the emulator follows SGLang 0.5.x's metrics.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sglang_target import MODEL, Target

pytestmark = pytest.mark.sglang_native

ESSENTIAL = [
    "sglang:num_running_reqs", "sglang:num_used_tokens", "sglang:token_usage", "sglang:gen_throughput",
    "sglang:num_queue_reqs", "sglang:num_grammar_queue_reqs", "sglang:cache_hit_rate",
    "sglang:spec_accept_length", "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
    "sglang:cached_tokens_total", "sglang:num_requests_total", "sglang:time_to_first_token_seconds",
    "sglang:inter_token_latency_seconds", "sglang:e2e_request_latency_seconds",
]


def test_metrics(target: Target) -> None:
    with target.http() as http:
        assert http.get("/health_generate").status_code == 200
        body = {"text": ["The capital of France is"] * 20, "stream": True,
                "sampling_params": {"temperature": 0, "max_new_tokens": 50, "ignore_eos": True}}
        with http.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            chunks = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert chunks[-1] == "data: [DONE]" and len(chunks) > 20
        for _ in range(2):  # twice, so that the second is served from the cache
            r = http.post("/generate", json={"text": "Hello, " * 100,
                                             "sampling_params": {"temperature": 0, "max_new_tokens": 5}})
            assert r.status_code == 200
        assert r.json()["meta_info"]["cached_tokens"] == r.json()["meta_info"]["prompt_tokens"] - 1
        metrics = http.get("/metrics")
    assert metrics.status_code == 200
    text = metrics.text
    for name in ESSENTIAL:
        assert name in text, f"missing metric: {name}"
    assert f'model_name="{MODEL}"' in text
    assert "_sum{" in text and "_count{" in text and "_bucket{" in text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    values = {name: v for (name, _), v in samples.items()}
    assert values["sglang:spec_accept_length"] == 0.0  # no speculative decoding
    assert values["sglang:cached_tokens_total"] > 0 and values["sglang:num_requests_total"] >= 22
