"""The Kafka ACLs of each service (lodestar/kafka_acls.py): what the code uses, and the docs show them."""

from __future__ import annotations

import pytest

from lodestar.kafka_acls import SERVICES, Acl, service_acls
from lodestar.settings import PROJECT_ROOT, Settings

SETTINGS = Settings(kafka={"topic_prefix": "p."}, dispatcher={"consumer_group": "d-group"},
                    learner={"consumer_group": "l-group"}, gateway={"gateway_id": "g1"})


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


def test_a_gateway_gets_its_own_reply_topic_and_sends_requests() -> None:
    describe_fixed = {("topic", t, "Describe", False) for t in ("p.requests", "p.results", "p.telemetry", "p.dlq")}
    assert grants(service_acls(SETTINGS, "gateway")) == describe_fixed | {
        ("topic", "p.requests", "Write", False), ("topic", "p.reply.g1", "Read", False),
        ("topic", "p.reply.g1", "Create", False)}
    # the chart's gateways: pods named <release>-gateway-<hash>, each deleting its reply topic when it stops
    chart = SETTINGS.model_copy(update={"gateway": SETTINGS.gateway.model_copy(
        update={"gateway_id": "rel-gateway-", "delete_reply_topic": True})})
    assert {("topic", "p.reply.rel-gateway-", op, True) for op in ("Read", "Create", "Delete")} <= grants(
        service_acls(chart, "gateway", gateway_ids_prefixed=True))
    with pytest.raises(ValueError, match="gateway_id"):
        service_acls(Settings(), "gateway")


def test_a_worker_needs_its_id() -> None:
    with pytest.raises(ValueError, match="worker_id"):
        service_acls(SETTINGS, "worker")


def test_the_documented_example_is_what_the_code_grants() -> None:
    doc = (PROJECT_ROOT / "docs" / "security.md").read_text()
    for acl in service_acls(Settings(), "learner"):
        assert f"$A {' '.join(acl.kafka_acls_args('User:lodestar-learner'))}\n" in doc
    assert Acl("topic", "x.", ("Write",), prefixed=True).kafka_acls_args("User:u") == [
        "--allow-principal", "User:u", "--operation", "Write", "--topic", "x.", "--resource-pattern-type", "prefixed"]


def test_the_secure_dev_broker_has_a_scram_user_for_every_service() -> None:
    """scripts/services formats its storage with the super user and one principal per service of SERVICES, so
    the secure integration tests can run each service as itself; a service added here needs its user there."""
    script = (PROJECT_ROOT / "scripts" / "services").read_text()
    (line,) = [x for x in script.splitlines() if x.startswith("SCRAM_USERS=(")]
    users = line.removeprefix("SCRAM_USERS=(").removesuffix(")").split()
    assert sorted(users) == sorted(["lodestar", *(f"lodestar-{s}" for s in SERVICES)])
