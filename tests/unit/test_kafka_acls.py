"""The Kafka ACLs of each service (lodestar/kafka_acls.py): what the code uses, and the docs show them."""

from __future__ import annotations

import pytest

from lodestar.kafka_acls import SERVICES, Acl, service_acls
from lodestar.settings import PROJECT_ROOT, Settings

SETTINGS = Settings(kafka={"topic_prefix": "p."}, dispatcher={"consumer_group": "d-group"},
                    learner={"consumer_group": "l-group"})


def grants(acls: list[Acl]) -> set[tuple[str, str, str, bool]]:
    return {(a.resource, a.name, op, a.prefixed) for a in acls for op in a.operations}


def test_each_service_gets_what_its_code_uses_and_nothing_of_the_others() -> None:
    dispatcher, learner, client = (grants(service_acls(SETTINGS, s)) for s in ("dispatcher", "learner", "client"))
    worker = grants(service_acls(SETTINGS, "worker", worker_id="w1"))
    assert ("topic", "p.requests", "Read", False) in dispatcher and ("group", "d-group", "Read", False) in dispatcher
    assert {("topic", "p.worker.", "Write", True), ("group", "p-worker-", "Read", True)} <= dispatcher
    assert {("topic", "p.worker.w1", "Read", False), ("group", "p-worker-w1", "Read", False),
            ("topic", "p.telemetry", "Write", False), ("topic", "p.reply.", "Write", True)} <= worker
    assert not any(name.startswith("p.worker.") and op not in ("Read", "Create") for _, name, op, _ in worker)
    describe_fixed = {("topic", t, "Describe", False) for t in ("p.requests", "p.results", "p.telemetry", "p.dlq")}
    assert learner == describe_fixed | {("topic", "p.telemetry", "Read", False), ("group", "l-group", "Read", False),
                                        ("topic", "p.dlq", "Write", False)}
    assert client == {("topic", "p.requests", "Write", False), ("topic", "p.results", "Read", False)}
    own = grants(service_acls(SETTINGS, "client", reply_topic="p.reply.me"))
    assert own == {("topic", "p.requests", "Write", False), ("topic", "p.reply.me", "Read", False),
                   ("topic", "p.reply.me", "Create", False)}
    for service in SERVICES:  # nobody reads requests but the dispatcher, nobody reads telemetry but the learner
        acls = grants(service_acls(SETTINGS, service, worker_id="w1"))
        assert (("topic", "p.requests", "Read", False) in acls) == (service == "dispatcher")
        assert (("topic", "p.telemetry", "Read", False) in acls) == (service == "learner")


def test_a_worker_needs_its_id() -> None:
    with pytest.raises(ValueError, match="worker_id"):
        service_acls(SETTINGS, "worker")


def test_the_documented_example_is_what_the_code_grants() -> None:
    doc = (PROJECT_ROOT / "docs" / "security.md").read_text()
    for acl in service_acls(Settings(), "learner"):
        assert f"$A {' '.join(acl.kafka_acls_args('User:lodestar-learner'))}\n" in doc
    assert Acl("topic", "x.", ("Write",), prefixed=True).kafka_acls_args("User:u") == [
        "--allow-principal", "User:u", "--operation", "Write", "--topic", "x.", "--resource-pattern-type", "prefixed"]
