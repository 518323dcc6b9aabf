"""The Kafka ACLs each Lodestar service needs on a broker with an authorizer, read from what the services do.

Every service checks at start that the fixed topics exist (Describe; an admin creates them with
`lodestar topics create`), a worker creates its own topic if it is missing, and idempotent producers need
only Write on their topics (Kafka 3.0+). Read and Write imply Describe. The dispatcher's rights on every
worker topic and worker group are what re-routing a dead worker's backlog needs: it joins that worker's
group to continue from its commits. docs/security.md explains each line; tests/integration/
test_secure_pipeline.py runs every service under exactly these on a broker with an authorizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lodestar.names import Topics
from lodestar.settings import Settings

Service = Literal["dispatcher", "worker", "learner", "client"]
SERVICES: tuple[Service, ...] = ("dispatcher", "worker", "learner", "client")


@dataclass(frozen=True)
class Acl:
    """Allow `operations` on the topic or consumer group `name` (every name starting with it if `prefixed`)."""

    resource: Literal["topic", "group"]
    name: str
    operations: tuple[str, ...]
    prefixed: bool = False

    def kafka_acls_args(self, principal: str) -> list[str]:
        """The arguments of Kafka's `kafka-acls.sh --add` that grant this to `principal` (e.g. User:name)."""
        args = ["--allow-principal", principal]
        for operation in self.operations:
            args += ["--operation", operation]
        args += [f"--{self.resource}", self.name]
        return [*args, "--resource-pattern-type", "prefixed"] if self.prefixed else args


def service_acls(settings: Settings, service: Service, *, worker_id: str | None = None,
                 reply_topic: str | None = None) -> list[Acl]:
    """What `service` needs under these settings' topic prefix and consumer groups; a worker's rights are for
    its own topic and group (`worker_id`), a client's for its own reply topic if it has one, else for the
    shared results topic."""
    t = Topics(settings.kafka.topic_prefix)
    describe_fixed = [Acl("topic", name, ("Describe",)) for name in t.fixed()]
    if service == "dispatcher":
        return [
            *describe_fixed,
            Acl("topic", t.requests, ("Read",)),
            Acl("group", settings.dispatcher.consumer_group, ("Read",)),
            Acl("topic", t.worker_topic_prefix, ("Read", "Write"), prefixed=True),  # routing, and takeovers
            Acl("group", t.worker_group_prefix, ("Read",), prefixed=True),  # a takeover joins the worker's group
            Acl("topic", t.results, ("Write",)),  # the result of a request it rejects
            Acl("topic", t.reply_prefix, ("Write",), prefixed=True),
            Acl("topic", t.dlq, ("Write",)),
        ]
    if service == "worker":
        if worker_id is None:
            raise ValueError("a worker's ACLs are for its own topic and group: give its worker_id")
        return [
            *describe_fixed,
            Acl("topic", t.worker(worker_id), ("Read", "Create")),
            Acl("group", t.worker_group(worker_id), ("Read",)),
            *(Acl("topic", name, ("Write",)) for name in (t.results, t.telemetry, t.dlq)),
            Acl("topic", t.reply_prefix, ("Write",), prefixed=True),
        ]
    if service == "learner":
        return [*describe_fixed, Acl("topic", t.telemetry, ("Read",)),
                Acl("group", settings.learner.consumer_group, ("Read",)), Acl("topic", t.dlq, ("Write",))]
    if service == "client":
        reads = Acl("topic", reply_topic, ("Read", "Create")) if reply_topic else Acl("topic", t.results, ("Read",))
        return [Acl("topic", t.requests, ("Write",)), reads]
    raise ValueError(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
