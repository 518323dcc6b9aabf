"""What the simulator records for each completed request: the routing decision and what was observed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lodestar.cluster_view import Decision, RequestInfo
from lodestar.features import as_dict
from lodestar.schemas import RoutingDecision, TelemetryEvent


@dataclass(slots=True)
class CompletedRequest:
    """One finished request. Times are virtual seconds; `features` is the chosen worker's candidate row."""

    request: RequestInfo
    decision: Decision
    gpu_type: str
    features: np.ndarray | None
    matched_prefix_tokens: int
    arrival_s: float
    first_token_s: float
    finished_s: float
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str

    @property
    def worker_id(self) -> str:
        return self.decision.worker_id

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s

    @property
    def e2e_s(self) -> float:
        return self.finished_s - self.arrival_s

    @property
    def tpot_s(self) -> float | None:
        """(latency - ttft) / (output - 1), as SGLang's bench_serving; None for one-token outputs."""
        if self.completion_tokens <= 1:
            return None
        return (self.finished_s - self.first_token_s) / (self.completion_tokens - 1)

    def to_telemetry_event(self) -> TelemetryEvent:
        """The same observation as the live workers publish it (virtual seconds become milliseconds)."""
        d = self.decision
        tpot = self.tpot_s
        return TelemetryEvent(
            request_id=self.request.request_id,
            decision=RoutingDecision(
                worker_id=d.worker_id, policy=d.policy, model_version=d.model_version,
                features=as_dict(self.features) if self.features is not None else {},
                predicted_ttft_ms=d.predicted_ttft_ms, explored=d.explored,
                matched_prefix_tokens=self.matched_prefix_tokens, dispatcher_id="sim",
                decided_at=self.arrival_s * 1000.0,
            ),
            gpu_type=self.gpu_type,
            status="ok",
            ttft_ms=self.ttft_s * 1000.0,
            tpot_ms=None if tpot is None else tpot * 1000.0,
            e2e_ms=self.e2e_s * 1000.0,
            prompt_tokens=self.prompt_tokens,
            cached_tokens=self.cached_tokens,
            completion_tokens=self.completion_tokens,
            sent_at=self.arrival_s * 1000.0,
            first_token_at=self.first_token_s * 1000.0,
            finished_at=self.finished_s * 1000.0,
        )
