"""The stack's readiness probes (app/readiness.py) without a broker: what a probe answers while the broker is not
ready for a consumer group yet."""

from __future__ import annotations

import pytest
from aiokafka.errors import GroupCoordinatorNotAvailableError, GroupLoadInProgressError, NotCoordinatorForGroupError

from app.readiness import GroupState, StackProbes
from lodestar.settings import Settings


@pytest.mark.parametrize("error", [GroupCoordinatorNotAvailableError, GroupLoadInProgressError,
                                   NotCoordinatorForGroupError])
async def test_a_group_without_a_coordinator_yet_is_not_ready_rather_than_an_error(
        error: type[Exception], monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh broker answers the first describe of a group with a retriable coordinator error (CI saw a whole
    module's fixture fail on it): the probe says the group has no members, and the wait on it polls again."""
    probes = StackProbes(Settings())

    async def describe(group_ids: list[str]) -> list[object]:
        raise error(f"no coordinator for {group_ids[0]} yet")

    monkeypatch.setattr(probes._admin, "describe_consumer_groups", describe)  # noqa: SLF001 - the broker's answer
    try:
        state = await probes.group("dispatchers")
    finally:
        await probes.__aexit__(None, None, None)  # closes every client (stopping an unstarted one is allowed)
    assert state == GroupState("Dead", ()) and not state.stable
