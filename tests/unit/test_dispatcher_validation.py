"""What the dispatcher dead-letters at admission (lodestar.limits on top of the schema), and the reason each
dead letter carries."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from app.cli import app as cli
from dispatcher.policies.base import SnapshotPolicy
from dispatcher.service import build_policy
from lodestar.limits import Limits
from lodestar.params import ParamsError
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


def test_policies_take_their_parameters_from_settings() -> None:
    settings = Settings(dispatcher={"policy_params": {"learned": {"worker_correction": "false"},
                                                      "sglang_cache_aware": {"cache_threshold": 0.5}}})
    learned = build_policy("learned", settings)
    assert isinstance(learned, SnapshotPolicy)
    assert learned.correction is None  # type: ignore[attr-defined]
    assert build_policy("sglang_cache_aware", settings).cache_threshold == 0.5  # type: ignore[attr-defined]
    assert not isinstance(build_policy("round_robin", settings), SnapshotPolicy)
    with pytest.raises(KeyError, match="unknown policy"):
        build_policy("no_such_policy", settings)


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"nope": {}}, "parameters given for unknown policy 'nope'"),
        ({"learned": {"fallback": "lmetric"}}, "policy 'learned': fallback: Extra inputs are not permitted"),
        ({"learned": {"check_range": "sometimes"}}, "check_range: Input should be a valid boolean"),
        ({"round_robin": {"seed": 3}}, "policy 'round_robin': seed: Extra inputs are not permitted"),
        ({"llmd_weighted": {"prefix_weight": "heavy"}}, "prefix_weight: Input should be a valid number"),
    ],
)
def test_bad_policy_parameters_are_refused_at_start_with_the_reason(params: dict, reason: str) -> None:
    # Every entry is checked, not only the running policy's: a typo waits for no policy switch.
    with pytest.raises(ParamsError, match=re.escape(reason)):
        build_policy("round_robin", Settings(dispatcher={"policy_params": params}))


def test_the_dispatcher_command_stops_on_bad_parameters_before_connecting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LODESTAR_DISPATCHER__POLICY_PARAMS", '{"learned": {"check_range": "sometimes"}}')
    result = CliRunner().invoke(cli, ["dispatcher"])
    assert result.exit_code == 2
    assert "policy 'learned': check_range: Input should be a valid boolean" in result.output
