"""Generate docs/asyncapi.yaml, the AsyncAPI 3.0 document of Lodestar's Kafka topics, so producers and
consumers in any language share the contracts of lodestar/schemas.py.

    .venv/bin/python scripts/gen_asyncapi.py           # rewrite docs/asyncapi.yaml
    .venv/bin/python scripts/gen_asyncapi.py --check   # exit 1 if it is out of date

The payload schemas are the message models' JSON Schemas (pydantic, validation mode: what the consumer
accepts), with nested models under components/schemas. The topic names come from lodestar/names.py,
partitions, groups and the broker address from the settings' defaults (not the environment), and each
message's example is built here from the models (the decision's features by lodestar/features.py).
tests/unit/test_asyncapi.py keeps the document current and checks it against the AsyncAPI 3.0 schema.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml
from pydantic.json_schema import models_json_schema

from dispatcher.routing import describe
from lodestar.cluster_view import ClusterView
from lodestar.features import as_dict, candidate_matrix
from lodestar.limits import Limits
from lodestar.names import WORKER_ID_PATTERN, Topics
from lodestar.schemas import (
    SCHEMA_VERSION,
    DeadLetter,
    InferenceRequest,
    InferenceResult,
    Message,
    RoutedRequest,
    RoutingDecision,
    SamplingParams,
    TelemetryEvent,
)
from lodestar.settings import (
    PROJECT_ROOT,
    DispatcherSettings,
    KafkaSettings,
    LearnerSettings,
    PrefixSettings,
    Settings,
)

OUTPUT = PROJECT_ROOT / "docs" / "asyncapi.yaml"
KAFKA_BINDING = "0.5.0"
SCHEMAS = "#/components/schemas/"

KAFKA = KafkaSettings()
TOPICS = Topics(KAFKA.topic_prefix)
LIMITS = Limits(Settings.model_construct())  # the defaults, not the environment
WORKER_PARAM = "workerId"
EXAMPLE_WORKER = "h100-0"

TRACE_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "The W3C trace context of the span that produced the message, so a request is one trace "
                   "across services (lodestar/tracing.py, docs/observability.md). These are the fields of the "
                   "default propagators (tracecontext, baggage); OTEL_PROPAGATORS may select others. Header "
                   "values are UTF-8. Nothing else depends on headers: a message without them is served, in a "
                   "new trace.",
    "properties": {
        "traceparent": {"type": "string", "pattern": "^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
                        "description": "W3C traceparent: version-trace id-parent span id-flags."},
        "tracestate": {"type": "string", "description": "W3C tracestate, when the context has one."},
        "baggage": {"type": "string", "description": "W3C baggage, when the context has any."},
    },
    "additionalProperties": {"type": "string"},
}
EXAMPLE_HEADERS = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}


@dataclass(frozen=True)
class Topic:
    """One channel: a topic, the message it carries, its key and who produces and consumes it."""

    id: str
    address: str
    model: type[Message]
    key: str
    partitions: int
    description: str
    traced: bool = True  # whether the producer puts the trace context in the headers


def _line(model: type) -> str:
    return inspect.cleandoc(model.__doc__ or "").splitlines()[0]


def topics() -> list[Topic]:
    """Every channel of the document, in data-flow order."""
    return [
        Topic("requests", TOPICS.requests, InferenceRequest, "The session id, else the request id: a session's "
              "turns stay in order on one partition.", KAFKA.request_partitions,
              "Client requests. Any client produces here (lodestar/client.py in Python); the dispatchers consume "
              "it as one consumer group and commit a batch only once its routed messages are acknowledged."),
        Topic("worker", f"{TOPICS.prefix}worker.{{{WORKER_PARAM}}}", RoutedRequest, "The request id.",
              KAFKA.worker_partitions,
              "One topic per worker: the requests routed to it, with the routing decision. The worker creates "
              "it at start and consumes it in its own group, which a dispatcher joins to re-route the backlog "
              "of a worker that stays dead (attempt + 1)."),
        Topic("results", TOPICS.results, InferenceResult, "The request id.", KAFKA.results_partitions,
              "The one final result of each request: from the worker that served it, or from a dispatcher that "
              "answered it itself (`rejected`: no live worker in time; `error`: its deadline passed). A request "
              "with `reply_to` gets its result on that topic instead (an allowed reply topic, never one of "
              "Lodestar's own). Delivery is at least once: a client keeps the first result per request id. A "
              "request sent again with its id within the dedupe window gets the stored result again, with "
              "`replayed` true."),
        Topic("telemetry", TOPICS.telemetry, TelemetryEvent, "The worker id.", KAFKA.telemetry_partitions,
              "What a worker observed for each request it served, with the decision as made: the learner's "
              "input."),
        Topic("dlq", TOPICS.dlq, DeadLetter, "The failed record's key (none if it had none).", 1,
              "Records that could not be processed, with the stage and reason: nothing is dropped silently "
              "(docs/operations.md).", traced=False),
    ]


def _worker_parameter() -> dict[str, Any]:
    return {"description": f"The worker's id, matching `{WORKER_ID_PATTERN.pattern}` (lodestar/names.py).",
            "examples": [EXAMPLE_WORKER]}


def examples() -> dict[type[Message], Message]:
    """One realistic message of each kind, built from the models: a session's second turn, described as the
    dispatcher describes it, on a busy H100 that holds the turn's first two prefix blocks (the decision's
    features computed by the one feature definition)."""
    request = InferenceRequest(
        request_id="6f1c0c9ad3f54b1c8f0e8a4d2b7c9e10",
        prompt="You are a concise literary assistant. Answer in one sentence, without spoilers beyond the "
               "first act, and name the play's author once. The user has asked about Shakespeare before. "
               "Question: what is Hamlet about?",
        sampling=SamplingParams(max_new_tokens=64, temperature=0.0), session_id="chat-42",
        metadata={"tenant": "docs"}, created_at=1767225600000.0,
    )
    info = describe(request, PrefixSettings())
    matched = 2 * info.tokens_per_block
    view = ClusterView.empty_like([EXAMPLE_WORKER], ["H100"])
    for name, value in (("running", 3), ("waiting", 1), ("inflight", 4), ("pending_prefill_tokens", 512),
                        ("kv_usage", 0.25), ("max_kv_tokens", 400_000), ("recent_ttft_ms", 48.0),
                        ("matched_prefix_tokens", matched)):
        getattr(view, name)[:] = value
    decision = RoutingDecision(
        worker_id=EXAMPLE_WORKER, policy="learned", model_version=7,
        features=as_dict(np.asarray(candidate_matrix(info, view)[0])), predicted_ttft_ms=52.5,
        matched_prefix_tokens=matched, dispatcher_id="dispatcher-a-4711", decided_at=1767225600004.0,
    )
    result = InferenceResult(
        request_id=request.request_id, worker_id=EXAMPLE_WORKER, status="ok",
        text="Shakespeare's Hamlet follows a Danish prince whose father's ghost asks him for revenge.",
        prompt_tokens=info.prompt_tokens, cached_tokens=matched,
        completion_tokens=14, ttft_ms=49.2, tpot_ms=7.1, e2e_ms=141.5, finish_reason="stop",
        completed_at=1767225600150.0,
    )
    telemetry = TelemetryEvent(
        request_id=request.request_id, decision=decision, gpu_type="H100", status="ok", ttft_ms=49.2, tpot_ms=7.1,
        e2e_ms=141.5, queue_ms=2.3, prompt_tokens=info.prompt_tokens, cached_tokens=matched, completion_tokens=14,
        sent_at=1767225600006.3, first_token_at=1767225600055.5, finished_at=1767225600150.0,
    )
    letter = DeadLetter(
        stage="validate", service="dispatcher",
        reason="invalid InferenceRequest: <message>: Value error, exactly one of a non-empty `prompt` or "
               "non-empty `input_ids` is required",
        topic=TOPICS.requests, partition=3, offset=1289, key="chat-42",
        payload='{"schema_version":1,"request_id":"a1","session_id":"chat-42"}', headers=EXAMPLE_HEADERS,
        failed_at=1767225600200.0,
    )
    return {InferenceRequest: request, RoutedRequest: RoutedRequest(request=request, decision=decision),
            InferenceResult: result, TelemetryEvent: telemetry, DeadLetter: letter}


def _message(topic: Topic, example: Message) -> dict[str, Any]:
    name = topic.model.__name__
    payload = example.model_dump(mode="json")
    message: dict[str, Any] = {
        "name": name,
        "title": name,
        "summary": _line(topic.model),
        "contentType": "application/json",
        "payload": {"$ref": f"{SCHEMAS}{name}"},
    }
    if topic.traced:
        message["headers"] = {"$ref": f"{SCHEMAS}TraceHeaders"}
    correlation = {RoutedRequest: "request/request_id", DeadLetter: None}.get(topic.model, "request_id")
    if correlation is not None:
        message["correlationId"] = {"description": "The request id.", "location": f"$message.payload#/{correlation}"}
    message["bindings"] = {"kafka": {"key": {"type": "string", "description": topic.key},
                                     "bindingVersion": KAFKA_BINDING}}
    example_entry: dict[str, Any] = {"name": f"{name}-example", "payload": payload}
    if topic.traced:
        example_entry["headers"] = EXAMPLE_HEADERS
    message["examples"] = [example_entry]
    return message


def _channel(topic: Topic) -> dict[str, Any]:
    channel: dict[str, Any] = {
        "address": topic.address,
        "title": topic.address,
        "description": topic.description,
        "messages": {topic.model.__name__: {"$ref": f"#/components/messages/{topic.model.__name__}"}},
    }
    if WORKER_PARAM in topic.address:
        channel["parameters"] = {WORKER_PARAM: _worker_parameter()}
    binding: dict[str, Any] = {"partitions": topic.partitions, "replicas": KAFKA.replication_factor,
                               "bindingVersion": KAFKA_BINDING}
    if WORKER_PARAM not in topic.address:
        binding = {"topic": topic.address, **binding}
    channel["bindings"] = {"kafka": binding}
    return channel


def _group(name: str, description: str) -> dict[str, Any]:
    return {"kafka": {"groupId": {"type": "string", "description": description, "examples": [name]},
                      "bindingVersion": KAFKA_BINDING}}


def _operation(action: str, channel: str, message: type[Message], summary: str, **extra: Any) -> dict[str, Any]:
    return {"action": action, "channel": {"$ref": f"#/channels/{channel}"}, "summary": summary,
            "messages": [{"$ref": f"#/channels/{channel}/messages/{message.__name__}"}], **extra}


def operations() -> dict[str, Any]:
    """What Lodestar's services do on each channel (a client does the opposite on requests and results)."""
    return {
        "routeRequests": _operation(
            "receive", "requests", InferenceRequest,
            "Dispatchers consume requests, route each to a worker and answer it exactly once (at least once on the "
            "wire) with an InferenceResult.",
            reply={"address": {"description": "The request's `reply_to` topic; without one, lodestar.results.",
                               "location": "$message.payload#/reply_to"},
                   "channel": {"$ref": "#/channels/results"},
                   "messages": [{"$ref": "#/channels/results/messages/InferenceResult"}]},
            bindings=_group(DispatcherSettings().consumer_group,
                            "The dispatchers' shared consumer group (setting dispatcher.consumer_group).")),
        "sendRoutedRequest": _operation("send", "worker", RoutedRequest,
                                        "A dispatcher publishes each routed request to its worker's topic."),
        "serveRoutedRequests": _operation(
            "receive", "worker", RoutedRequest,
            "The worker serves its requests on its engine, many at once, and commits in order.",
            bindings=_group(TOPICS.worker_group(EXAMPLE_WORKER),
                            "The worker's own group, `<topic prefix without the dot>-worker-<workerId>`; a "
                            "dispatcher joins it to take over a dead worker's backlog.")),
        "sendResult": _operation("send", "results", InferenceResult,
                                 "The worker publishes each request's result (a dispatcher publishes rejections)."),
        "sendTelemetry": _operation("send", "telemetry", TelemetryEvent,
                                    "The worker publishes what it observed for each request."),
        "learnFromTelemetry": _operation(
            "receive", "telemetry", TelemetryEvent, "The learner learns TTFT online from telemetry.",
            bindings=_group(LearnerSettings().consumer_group, "The learner's group (setting learner.consumer_group).")),
        "sendDeadLetter": _operation("send", "dlq", DeadLetter,
                                     "Any service dead-letters a record it cannot process, with the reason."),
    }


def payload_schemas() -> dict[str, Any]:
    """The JSON Schema of every message model (and of the models they nest), keyed by model name."""
    models = [t.model for t in topics()]
    _, top = models_json_schema([(m, "validation") for m in models], ref_template=SCHEMAS + "{model}")
    return top["$defs"]


def document() -> dict[str, Any]:
    """The AsyncAPI document as a mapping."""
    chosen = examples()
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Lodestar",
            "version": str(SCHEMA_VERSION),
            "description": inspect.cleandoc(f"""
                The Kafka contracts of Lodestar, an online-learning request router for LLM inference
                (docs/architecture.md). A client produces an InferenceRequest to `{TOPICS.requests}` and reads its
                InferenceResult from `{TOPICS.results}` or from the topic in its `reply_to`; the other topics are
                Lodestar's own. The operations below are what Lodestar's services do.

                Messages are UTF-8 JSON, strict (unknown fields are refused, types are not coerced), and carry
                `schema_version` ({SCHEMA_VERSION}); a contract changes only with a version bump. Numbers are
                finite (`NaN` and `Infinity` are refused). The payload schemas are those of the models in
                lodestar/schemas.py, bounds included. Rules they do not state, which the deployment sets
                (settings `limits.*`, docs/architecture.md "Bounds on input"): an InferenceRequest has exactly
                one of a non-empty `prompt` or non-empty `input_ids`; it is at most `limits.max_message_bytes`
                minus 64 KiB long as sent ({LIMITS.max_request_bytes:,} bytes by default), so that its routed
                copy fits the broker; its token ids are at most `limits.max_token_id` (the model's vocabulary
                size - 1; {LIMITS.max_token_id:,} by default); its `reply_to` matches
                `limits.reply_to_pattern` (by default `<prefix>results` or `<prefix>reply.<name>`) and is
                never a Kafka internal topic nor one of Lodestar's own. `deadline_ms` is an absolute time in
                epoch milliseconds: a request not served by then is answered with an `error` result instead.
                `priority` is passed to SGLang's `/generate` `priority`. A `request_id` is an idempotency key
                for an hour. A message that breaks a rule is not served: it goes to `{TOPICS.dlq}` with the
                reason.

                Topic names are under the setting kafka.topic_prefix (default `{TOPICS.prefix}`); partitions
                are the settings' defaults.
            """),
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {
            "local": {"host": KAFKA.bootstrap_servers, "protocol": "kafka",
                      "description": "The local broker of scripts/services (setting kafka.bootstrap_servers)."},
        },
        "channels": {t.id: _channel(t) for t in topics()},
        "operations": operations(),
        "components": {
            "messages": {t.model.__name__: _message(t, chosen[t.model]) for t in topics()},
            "schemas": {"TraceHeaders": TRACE_HEADERS, **payload_schemas()},
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the descriptions read as text; no anchors: each example whole."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render() -> str:
    """The whole document, as YAML."""
    header = "# Generated by scripts/gen_asyncapi.py from lodestar/schemas.py; do not edit by hand.\n"
    return header + yaml.dump(document(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=110)


if __name__ == "__main__":
    from docgen import generate  # scripts/ is on the path when this runs as a script

    sys.exit(generate(OUTPUT, render, __doc__))
