"""docs/asyncapi.yaml is generated from the message models, matches them, is valid AsyncAPI 3.0, and its
example of each message is valid under its schema and accepted by the code that consumes it."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from functools import cache
from types import ModuleType
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from opentelemetry import baggage, trace

from learner.service import validate_telemetry
from lodestar import schemas, tracing
from lodestar.limits import Limits
from lodestar.names import Topics
from lodestar.settings import PROJECT_ROOT, Settings

ASYNCAPI_SCHEMA = PROJECT_ROOT / "tests" / "data" / "asyncapi-3.0.0" / "schema.json"


@cache
def generator() -> ModuleType:
    path = PROJECT_ROOT / "scripts" / "gen_asyncapi.py"
    spec = importlib.util.spec_from_file_location("gen_asyncapi", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@cache
def committed() -> dict[str, Any]:
    return yaml.safe_load(generator().OUTPUT.read_text())


@cache
def asyncapi_validator() -> Draft7Validator:
    schema = json.loads(ASYNCAPI_SCHEMA.read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def payload_validator(doc: dict[str, Any], schema_name: str) -> Draft7Validator:
    """A validator for one components/schemas entry, resolving its references within the document."""
    return Draft7Validator({"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]})


def wire_models() -> list[type[schemas.Message]]:
    found, todo = [], list(schemas.Message.__subclasses__())
    while todo:
        model = todo.pop()
        found.append(model)
        todo.extend(model.__subclasses__())
    return found


def test_committed_document_is_up_to_date() -> None:
    gen = generator()
    assert gen.OUTPUT.read_text() == gen.render(), "run: .venv/bin/python scripts/gen_asyncapi.py"


def test_document_is_valid_asyncapi_3() -> None:
    errors = [f"{e.json_path}: {e.message[:200]}" for e in asyncapi_validator().iter_errors(committed())]
    assert not errors, "\n".join(errors[:10])


@pytest.mark.parametrize("mutate", [
    lambda d: d["operations"]["routeRequests"].update(action="publish"),  # an AsyncAPI 2 word
    lambda d: d["channels"]["requests"]["bindings"]["kafka"].update(partitions=0),
    lambda d: d["components"]["schemas"]["InferenceRequest"].update(type=7),
    lambda d: d.update(asyncapi="2.6.0"),
], ids=["action", "kafka-binding", "payload-schema", "version"])
def test_the_asyncapi_check_catches_a_broken_document(mutate: Any) -> None:
    doc = copy.deepcopy(committed())
    mutate(doc)
    assert list(asyncapi_validator().iter_errors(doc))


def test_every_reference_resolves() -> None:
    doc = committed()

    def refs(node: Any) -> list[str]:
        if isinstance(node, dict):
            return [node["$ref"]] if "$ref" in node else [r for v in node.values() for r in refs(v)]
        if isinstance(node, list):
            return [r for v in node for r in refs(v)]
        return []

    found = refs(doc)
    assert len(found) > 20
    for ref in found:
        assert ref.startswith("#/"), ref
        node: Any = doc
        for part in ref[2:].split("/"):
            assert part in node, f"{ref} does not resolve"
            node = node[part]


def test_payload_schemas_are_the_models_schemas() -> None:
    components = committed()["components"]["schemas"]
    prefix = "#/components/schemas/"
    for model in wire_models():
        schema = model.model_json_schema(ref_template=prefix + "{model}")
        nested = schema.pop("$defs", {})
        assert components[model.__name__] == schema, f"{model.__name__} differs from the model"
        for name, sub in nested.items():
            assert components[name] == sub, f"{name} (nested in {model.__name__}) differs from the model"


def test_every_topic_is_a_channel_with_its_message() -> None:
    doc = committed()
    topics = Topics(generator().KAFKA.topic_prefix)
    by_address = {c["address"]: c for c in doc["channels"].values()}
    expected = {topics.requests: "InferenceRequest", topics.results: "InferenceResult",
                topics.telemetry: "TelemetryEvent", topics.dlq: "DeadLetter",
                topics.prefix + "worker.{workerId}": "RoutedRequest"}
    assert set(topics.fixed()) < set(by_address)
    assert {address: list(c["messages"]) for address, c in by_address.items()} == {
        address: [message] for address, message in expected.items()}
    worker = doc["channels"]["worker"]
    example = worker["parameters"]["workerId"]["examples"][0]
    assert worker["address"].replace("{workerId}", example) == topics.worker(example)
    group = doc["operations"]["serveRoutedRequests"]["bindings"]["kafka"]["groupId"]["examples"][0]
    assert group == topics.worker_group(example)


def test_each_message_has_a_valid_example_that_its_consumer_accepts() -> None:
    doc = committed()
    messages = doc["components"]["messages"]
    assert set(messages) == {m.__name__ for m in wire_models()} - {"RoutingDecision"}
    for name, message in messages.items():
        (example,) = message["examples"]
        payload_errors = list(payload_validator(doc, name).iter_errors(example["payload"]))
        assert not payload_errors, f"{name} example: {payload_errors[0].message}"
        if "headers" in message:
            assert not list(payload_validator(doc, "TraceHeaders").iter_errors(example["headers"]))
        model = getattr(schemas, name)
        decoded = schemas.decode(model, json.dumps(example["payload"]))
        assert decoded.model_dump(mode="json") == example["payload"]
    request = json.dumps(messages["InferenceRequest"]["examples"][0]["payload"]).encode()
    limits = Limits(Settings())
    assert limits.decode_request(request).request_id == "6f1c0c9ad3f54b1c8f0e8a4d2b7c9e10"
    telemetry = json.dumps(messages["TelemetryEvent"]["examples"][0]["payload"]).encode()
    sample = validate_telemetry(telemetry, 600_000.0, limits)
    assert sample is not None and sample.ttft_ms == pytest.approx(49.2)


@pytest.mark.parametrize(("name", "change"), [
    ("InferenceRequest", {"temperature_celsius": 20}),  # unknown field
    ("InferenceRequest", {"priority": "high"}),
    ("InferenceResult", {"status": "maybe"}),
    ("TelemetryEvent", {"ttft_ms": -1.0}),
    ("RoutedRequest", {"decision": None}),
], ids=["unknown-field", "type", "enum", "bound", "required-object"])
def test_payload_schemas_refuse_what_the_models_refuse(name: str, change: dict[str, Any]) -> None:
    doc = committed()
    payload = {**doc["components"]["messages"][name]["examples"][0]["payload"], **change}
    assert list(payload_validator(doc, name).iter_errors(payload))
    with pytest.raises(schemas.InvalidMessage):
        schemas.decode(getattr(schemas, name), json.dumps(payload))


def test_the_headers_the_code_sets_are_the_documented_ones() -> None:
    doc = committed()
    tracer = tracing.in_memory_tracing("asyncapi").tracer("asyncapi")
    span = tracer.start_span("send")
    context = baggage.set_baggage("tenant", "docs", trace.set_span_in_context(span))
    headers = {k: v.decode() for k, v in tracing.inject_headers(context)}
    span.end()
    assert "traceparent" in headers and "baggage" in headers
    assert set(headers) <= set(doc["components"]["schemas"]["TraceHeaders"]["properties"])
    assert not list(payload_validator(doc, "TraceHeaders").iter_errors(headers))
