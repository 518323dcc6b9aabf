"""End to end on the real broker and Redis: emulators, workers, the learner and two dispatchers as
`lodestar` processes, requests through the client library.

One pipeline serves the module (starting one costs ~20 s on a 2-core host); it has its own topics, keys
and consumer groups. The learner runs river (incremental: a snapshot every 20 events) so that learning
reaches the dispatchers within seconds.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from stack_harness import Pipeline, Run, e2e_settings, engines, running_pipeline, shared_prefix_requests, two_waves
from worker_harness import TopicReader, produce

from lodestar.schemas import DeadLetter

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

DISPATCHERS = ["e2e-1", "e2e-2"]
WAVE_1, WAVE_2 = 60, 40


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pipeline(kafka_bootstrap: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory
                   ) -> AsyncIterator[Pipeline]:
    tmp = tmp_path_factory.mktemp("e2e-pipeline")
    settings = e2e_settings(tmp / "learner.json", dispatcher={"policy": "learned"},
                            learner={"model": "river", "snapshot_every_events": 20, "snapshot_every_s": 1.0})
    async with running_pipeline(settings, tmp / "logs", engines("H100", "L4"), DISPATCHERS, "learned",
                                time_scale=0.2) as pipeline:
        yield pipeline


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def run(pipeline: Pipeline) -> Run:
    waves = [shared_prefix_requests(WAVE_1, 8, tag="wave1"), shared_prefix_requests(WAVE_2, 8, tag="wave2")]
    return await two_waves(pipeline, waves, rate_per_s=30)


async def test_every_request_gets_exactly_one_result(run: Run) -> None:
    sent = [r.request_id for wave in run.waves for r in wave]
    assert [a.request_id if a else None for a in run.answers] == sent
    assert all(a is not None and a.status == "ok" and a.completion_tokens == 8 for a in run.answers)
    assert Counter(r.request_id for r in run.results_on_topic) == Counter(sent)  # one each on the wire, too
    assert run.duplicates_seen_by_client == 0
    assert sorted(run.telemetry) == sorted(sent)


async def test_two_dispatchers_share_the_requests(run: Run) -> None:
    routed_by = Counter(e.decision.dispatcher_id for e in run.telemetry.values())
    assert set(routed_by) == set(DISPATCHERS), routed_by
    assert min(routed_by.values()) >= 10, routed_by


async def test_the_learners_snapshot_reaches_the_dispatchers(run: Run) -> None:
    first, second = ([run.telemetry[r.request_id].decision.model_version for r in wave] for wave in run.waves)
    assert first[0] == 0, "the run starts without a model"
    assert run.snapshot_version >= 1
    assert min(second) >= 1, f"decisions after the snapshot still use model versions {Counter(second)}"
    assert max(second) >= run.snapshot_version  # at least the version published before wave 2


async def test_malformed_input_ends_in_the_dlq_with_its_reason(pipeline: Pipeline) -> None:
    topics = pipeline.topics
    bad_requests = [b"{not json", json.dumps({"request_id": "no-prompt"}).encode(),
                    json.dumps({"schema_version": 9, "prompt": "hi"}).encode()]
    bad_telemetry = json.dumps({"request_id": "t-1", "gpu_type": "H100", "status": "ok"}).encode()
    async with TopicReader(pipeline.settings, topics.dlq) as reader:
        await produce(pipeline.settings, topics.requests, bad_requests)
        await produce(pipeline.settings, topics.telemetry, [bad_telemetry])
        wanted = {*bad_requests, bad_telemetry}
        await reader.wait_for(lambda m: wanted <= {d["payload"].encode() for d in m[topics.dlq]}, timeout=30)
    letters = {d.payload.encode(): d for d in (DeadLetter.model_validate(m) for m in reader.messages[topics.dlq])}
    for raw in bad_requests:
        letter = letters[raw]
        assert (letter.service, letter.stage, letter.topic) == ("dispatcher", "validate", topics.requests)
        assert letter.reason.startswith("invalid InferenceRequest") and letter.offset is not None
    assert "JSON" in letters[bad_requests[0]].reason
    assert "exactly one of a non-empty `prompt` or non-empty `input_ids`" in letters[bad_requests[1]].reason
    assert "schema_version" in letters[bad_requests[2]].reason
    telemetry_letter = letters[bad_telemetry]
    assert (telemetry_letter.service, telemetry_letter.topic) == ("learner", topics.telemetry)
    assert "decision: Field required" in telemetry_letter.reason


async def test_logs_are_written_per_process(pipeline: Pipeline) -> None:
    logs = {Path(p.log_path).name for p in pipeline.stack.processes}
    assert logs == {"emulator-h100-0.log", "emulator-l4-0.log", "worker-h100-0.log", "worker-l4-0.log",
                    "learner.log", "dispatcher-e2e-1.log", "dispatcher-e2e-2.log"}
    assert all(p.returncode() is None for p in pipeline.stack.processes)
