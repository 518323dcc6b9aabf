"""Granting lodestar/kafka_acls.py's ACLs on the test broker (CreateAcls, with aiokafka's own protocol
structs: its admin client has no public call for it), as a super user."""

from __future__ import annotations

from aiokafka.protocol.admin import CreateAclsRequest

from lodestar.kafka_acls import Acl
from lodestar.kafka_io import make_admin
from lodestar.settings import Settings

# Kafka's wire codes (org.apache.kafka.common.resource.ResourceType, PatternType, acl.AclOperation, ...)
RESOURCE = {"topic": 2, "group": 3}
PATTERN = {False: 3, True: 4}  # LITERAL, PREFIXED
OPERATION = {"Read": 3, "Write": 4, "Create": 5, "Delete": 6, "Describe": 8}
ALLOW = 3


async def grant(admin_settings: Settings, principal: str, acls: list[Acl]) -> None:
    """Create every ACL for `principal` (e.g. User:lodestar-worker); fails on the broker's first error."""
    admin = make_admin(admin_settings, client_id="test-acls")
    await admin.start()
    try:
        for acl in acls:
            for operation in acl.operations:
                request = CreateAclsRequest(RESOURCE[acl.resource], acl.name, PATTERN[acl.prefixed], principal, "*",
                                            OPERATION[operation], ALLOW)
                response = await admin._send_request(request)  # noqa: SLF001 - no public CreateAcls in aiokafka
                for error_code, message in response.creation_responses:
                    assert error_code == 0, f"CreateAcls {acl} {operation} for {principal}: {error_code} {message}"
    finally:
        await admin.close()
