"""Hostile input for Lodestar's consumers, generated with hypothesis: messages drawn field by field from the
schemas (inside and outside every bound), valid messages mutated at a random place, and raw bytes; with
hostile keys and headers. `generate` collects many examples at once, so a test can produce them in bulk to
the real broker and check what the services made of each (the integration fuzz tests, and the poison
catalogue `POISON` for the documented cases).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.features import as_dict, candidate_matrix
from lodestar.hardware import GPUS
from lodestar.names import Topics
from lodestar.schemas import EPOCH_MS_MAX, MAX_TOKEN_ID, RoutingDecision, TelemetryEvent, now_ms

HOUR_MS = 3_600_000.0


@dataclass(frozen=True)
class Fuzzed:
    """One record to produce: its value, key and headers."""

    value: bytes | None
    key: bytes | None = None
    headers: tuple[tuple[str, bytes], ...] = ()


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, allow_nan=True).encode()  # NaN and Infinity as JSON5-ish literals: hostile too


floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1e-300, 1e308, -1.0, 0.5, 1.0, 100.0, 101.0]),
)
ints = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, MAX_TOKEN_ID, MAX_TOKEN_ID + 1, 2**32, 2**63, 262_143, 262_144]),
)
texts = st.one_of(st.text(max_size=40), st.text(alphabet="abc.-_:", min_size=1, max_size=12),
                  st.sampled_from(["", " ", "\x00", "\ud7ff", "é" * 5, "a" * 129, "a" * 300]))
json_values = st.recursive(
    st.none() | st.booleans() | ints | floats | texts,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
    max_leaves=6,
)


def deadlines() -> st.SearchStrategy[float | None]:
    """None, or clearly past, or clearly future (never within the hour: the outcome must not race the clock)."""
    now = now_ms()
    return st.one_of(st.none(), st.floats(0.0, now - HOUR_MS), st.floats(now + HOUR_MS, EPOCH_MS_MAX))


def reply_topics(topics: Topics) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from([topics.results, f"{topics.prefix}reply.fuzz", "__consumer_offsets", topics.requests,
                         topics.dlq, topics.telemetry, topics.worker("w0"), "elsewhere", "not a topic", ""]),
        texts,
    )


def request_docs(topics: Topics) -> st.SearchStrategy[dict[str, Any]]:
    """InferenceRequest-shaped documents: every field optional, drawn inside and outside its bounds."""
    ids = st.one_of(st.text(alphabet="abcdef0123456789-:._", min_size=1, max_size=40), texts)
    prompt = st.one_of(st.text(min_size=1, max_size=60), texts)
    token_ids = st.lists(st.one_of(st.integers(0, 1000), ints), max_size=24)
    sampling = st.fixed_dictionaries({}, optional={
        "max_new_tokens": st.one_of(st.integers(1, 64), ints), "temperature": floats,
        "top_p": floats, "stop": st.lists(texts, max_size=4), "ignore_eos": st.booleans() | json_values,
    })
    metadata = st.dictionaries(texts, st.one_of(texts, json_values), max_size=4)
    return st.fixed_dictionaries({}, optional={
        "schema_version": st.sampled_from([1, 1, 1, 2, "1", None]),
        "request_id": ids, "prompt": prompt, "input_ids": token_ids, "sampling": sampling,
        "session_id": st.one_of(ids, st.none()), "reply_to": reply_topics(topics),
        "priority": st.one_of(st.none(), st.integers(-10, 10), ints), "deadline_ms": deadlines(),
        "metadata": metadata, "created_at": st.one_of(st.floats(1e12, 2e12), floats),
        "colour": json_values,
    })


def valid_request_docs(topics: Topics) -> st.SearchStrategy[dict[str, Any]]:
    """Requests inside every bound (most are routed; those with a past deadline are answered)."""
    ids = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._:-", min_size=1, max_size=128)
    body = st.one_of(
        st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=80)}),
        st.fixed_dictionaries({"input_ids": st.lists(st.integers(0, 262_143), min_size=1, max_size=64)}),
    )
    return st.tuples(body, st.fixed_dictionaries({"request_id": ids}, optional={
        "sampling": st.fixed_dictionaries({}, optional={
            "max_new_tokens": st.integers(1, 4096), "temperature": st.floats(0, 2),
            "stop": st.lists(st.text(min_size=1, max_size=20), max_size=4)}),
        "session_id": ids, "reply_to": st.sampled_from([topics.results, f"{topics.prefix}reply.fuzz"]),
        "priority": st.integers(-100, 100), "deadline_ms": deadlines(),
        "metadata": st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=30), max_size=3),
    })).map(lambda parts: {**parts[0], **parts[1]})


@st.composite
def mutated(draw: st.DrawFn, docs: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any] | list[Any] | Any:
    """A document with one place changed: a value replaced, a key removed or added, or the whole replaced."""
    doc = draw(docs)
    path: list[Any] = []
    node: Any = doc
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(node) if isinstance(node, dict) else list(range(len(node)))))
        path.append(key)
        node = node[key]
    action = draw(st.sampled_from(["replace", "delete", "add", "whole"]))
    if action == "whole" or not path:
        return draw(json_values) if action == "whole" else {**doc, draw(texts): draw(json_values)}
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if action == "replace":
        parent[path[-1]] = draw(json_values)
    elif action == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(texts)] = draw(json_values)
    return doc


keys = st.one_of(st.none(), st.binary(max_size=64))
headers = st.lists(st.tuples(st.sampled_from(["traceparent", "tracestate", "baggage", "x"]) | st.text(max_size=20),
                             st.binary(max_size=200)), max_size=4).map(tuple)


def requests(topics: Topics) -> st.SearchStrategy[Fuzzed]:
    """What a hostile or broken client may produce to the requests topic."""
    values = st.one_of(
        valid_request_docs(topics).map(_dumps),
        request_docs(topics).map(_dumps),
        mutated(valid_request_docs(topics)).map(_dumps),
        st.binary(max_size=300),
        st.sampled_from([b"", b"null", b"[]", b"{}", b"\xff\xfe", b'{"prompt": "x"}']),
    )
    return st.builds(Fuzzed, values, keys, headers)


def telemetry_docs() -> st.SearchStrategy[dict[str, Any]]:
    """Valid telemetry: a routed request's features as the dispatcher computed them, and what was observed."""
    def event(prompt: int, matched: int, running: int, gpu: str, ttft: float, status: str) -> dict[str, Any]:
        view = ClusterView.empty_like(["w0"], [gpu])
        view.running[:] = running
        view.matched_prefix_tokens[:] = matched
        features = as_dict(candidate_matrix(RequestInfo("r", prompt_tokens=prompt), view)[0])
        decision = RoutingDecision(worker_id="w0", policy="fuzz", features=features)
        return TelemetryEvent(request_id="r", decision=decision, gpu_type=gpu, status=status,  # type: ignore[arg-type]
                              ttft_ms=ttft if status == "ok" else None, e2e_ms=ttft + 10.0).model_dump(mode="json")

    return st.builds(event, st.integers(1, 8000), st.integers(0, 8000), st.integers(0, 64),
                     st.sampled_from(sorted(GPUS)), st.floats(1.0, 60_000.0), st.sampled_from(["ok", "ok", "error"]))


def telemetry() -> st.SearchStrategy[Fuzzed]:
    """What may land on the telemetry topic: good events, broken ones, garbage."""
    values = st.one_of(
        telemetry_docs().map(_dumps),
        mutated(telemetry_docs()).map(_dumps),
        st.binary(max_size=300),
    )
    return st.builds(Fuzzed, values, keys, headers)


def generate(strategy: st.SearchStrategy[Fuzzed], n: int, random_seed: int = 0) -> list[Fuzzed]:
    """`n` examples of `strategy`, drawn by hypothesis in one go (generation only: no shrinking, no database),
    reproducibly from `random_seed`."""
    out: list[Fuzzed] = []

    @seed(random_seed)
    @settings(max_examples=n, phases=[Phase.generate], database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Fuzzed) -> None:
        out.append(example)

    collect()
    return out


def generate_requests(prefix: str, n: int, random_seed: int) -> list[Fuzzed]:
    """`n` hostile records for the requests topic of `prefix` (a top-level function: a worker process can run
    it, where the strategies, which do not pickle, are built)."""
    return generate(requests(Topics(prefix)), n, random_seed)


def generate_telemetry(n: int, random_seed: int) -> list[Fuzzed]:
    """`n` hostile records for the telemetry topic (see `generate_requests`)."""
    return generate(telemetry(), n, random_seed)


def poison(topics: Topics) -> dict[str, bytes]:
    """The documented poison cases for the requests topic (issue 13), by name."""
    now = now_ms()
    return {
        "uint32 overflow": b'{"request_id":"p1","input_ids":[4294967296]}',
        "beyond the vocabulary": b'{"request_id":"p2","input_ids":[1, 262144]}',
        "near 1 MB": json.dumps({"request_id": "p3", "prompt": "a" * 1_040_000}).encode(),
        "NaN": b'{"request_id":"p4","prompt":"x","sampling":{"temperature":NaN}}',
        "Infinity deadline": b'{"request_id":"p5","prompt":"x","deadline_ms":Infinity}',
        "reply to __consumer_offsets": _dumps({"request_id": "p6", "prompt": "x", "reply_to": "__consumer_offsets"}),
        "reply to the requests topic": _dumps({"request_id": "p7", "prompt": "x", "reply_to": topics.requests}),
        "reply to a worker topic": _dumps({"request_id": "p8", "prompt": "x", "reply_to": topics.worker("w0")}),
        "expired deadline": _dumps({"request_id": "p9", "prompt": "x", "deadline_ms": now - 60_000}),
        "lone surrogate": b'{"request_id":"p10","prompt":"\\ud800"}',
        "not JSON": b"\x00\xff garbage",
    }
