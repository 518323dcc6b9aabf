"""What the dispatcher dead-letters at admission (lodestar.limits on top of the schema), and the reason each
dead letter carries."""

from __future__ import annotations

import json

import pytest

from dispatcher.service import SnapshotPolicy, build_policy
from lodestar.limits import Limits
from lodestar.schemas import InferenceRequest, InvalidMessage
from lodestar.settings import Settings

validate_request = Limits(Settings()).decode_request


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, "empty message"),
        (b"\xff\xfe not json", "Invalid JSON"),
        (json.dumps({"request_id": "r1"}).encode(), "exactly one of a non-empty `prompt` or non-empty `input_ids`"),
        (json.dumps({"prompt": "hi", "input_ids": [1, 2]}).encode(), "exactly one of"),
        (json.dumps({"prompt": "hi", "schema_version": 2}).encode(), "schema_version"),
        (json.dumps({"prompt": "hi", "colour": "blue"}).encode(), "colour: Extra inputs are not permitted"),
        (json.dumps({"input_ids": [1, -5]}).encode(), "input_ids.1"),
        (json.dumps({"prompt": "hi", "sampling": {"max_new_tokens": 0}}).encode(), "sampling.max_new_tokens"),
        (json.dumps({"prompt": "hi", "reply_to": "no spaces allowed"}).encode(), "reply_to: String should match"),
        (InferenceRequest(prompt="hi", reply_to="my.replies-1").to_bytes(), "is not an allowed reply topic"),
    ],
)
def test_invalid_requests_are_refused_with_a_readable_reason(raw: bytes | None, reason: str) -> None:
    with pytest.raises(InvalidMessage) as info:
        validate_request(raw)
    assert reason in info.value.reason


def test_valid_requests_pass_unchanged() -> None:
    request = InferenceRequest(input_ids=[1, 2, 3], reply_to="lodestar.reply.frontend-1", session_id="s")
    assert validate_request(request.to_bytes()) == request


def test_only_the_learned_policy_follows_snapshots() -> None:
    settings = Settings()
    learned = build_policy("learned", settings)
    assert isinstance(learned, SnapshotPolicy)
    assert learned.fallback.name == settings.dispatcher.fallback_policy  # type: ignore[attr-defined]
    assert not isinstance(build_policy("round_robin", settings), SnapshotPolicy)
    with pytest.raises(KeyError, match="unknown policy"):
        build_policy("no_such_policy", settings)
