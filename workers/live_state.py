"""What a worker advertises about itself: the engine's load plus the worker's own bookkeeping.

The engine reports running/waiting requests and KV usage; the worker adds what only it knows: its
in-flight count, the uncached prompt tokens of its requests still waiting for a first token
(pending prefill), moving averages of recent TTFT and output length (lodestar.worker_averages), and whether
it is draining.
"""

from __future__ import annotations

import math

from lodestar.chat import render_messages
from lodestar.schemas import RoutedRequest, WorkerState, now_ms
from lodestar.worker_averages import OUTPUT_ALPHA, TTFT_ALPHA, smoothed
from workers.sglang_client import EngineLoad

CHARS_PER_TOKEN = 4  # the same rough text-to-token ratio the dispatcher uses for text prompts


def estimate_uncached_tokens(routed: RoutedRequest) -> int:
    """Prompt tokens the engine still has to prefill: the router's own estimate when it sent one."""
    from_router = routed.decision.features.get("uncached_tokens")
    if from_router is not None and math.isfinite(from_router):
        return max(int(from_router), 0)
    request = routed.request
    text = render_messages(request.messages) if request.messages else request.prompt or ""
    prompt = len(request.input_ids) if request.input_ids else math.ceil(len(text) / CHARS_PER_TOKEN)
    return max(prompt - routed.decision.matched_prefix_tokens, 0)


class LiveState:
    """The worker's live state, updated by request handling and load polling."""

    def __init__(self, worker_id: str, gpu_type: str, topic: str):
        self.worker_id = worker_id
        self.gpu_type = gpu_type
        self.topic = topic
        self.draining = False
        self.engine = EngineLoad(running=0, waiting=0, kv_usage=0.0, max_kv_tokens=0, source="")
        self.recent_ttft_ms = 0.0
        self.recent_output_tokens = 0.0
        self._awaiting_first_token: dict[str, int] = {}
        self._inflight: set[str] = set()

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def pending_prefill_tokens(self) -> int:
        return sum(self._awaiting_first_token.values())

    def started(self, request_id: str, uncached_tokens: int) -> None:
        """A request was sent to the engine."""
        self._inflight.add(request_id)
        self._awaiting_first_token[request_id] = uncached_tokens

    def first_token(self, request_id: str) -> None:
        """The request's prefill is over."""
        self._awaiting_first_token.pop(request_id, None)

    def finished(self, request_id: str, ttft_ms: float | None, completion_tokens: int | None = None) -> None:
        """The request left the engine; an observed TTFT and a completion feed their moving averages."""
        self._inflight.discard(request_id)
        self._awaiting_first_token.pop(request_id, None)
        if ttft_ms is not None:
            self.recent_ttft_ms = smoothed(self.recent_ttft_ms, ttft_ms, TTFT_ALPHA)
        if completion_tokens:
            self.recent_output_tokens = smoothed(self.recent_output_tokens, float(completion_tokens), OUTPUT_ALPHA)

    def snapshot(self) -> WorkerState:
        """The state to publish in the registry."""
        return WorkerState(
            worker_id=self.worker_id,
            gpu_type=self.gpu_type,
            topic=self.topic,
            running=self.engine.running,
            waiting=self.engine.waiting,
            inflight=self.inflight,
            pending_prefill_tokens=self.pending_prefill_tokens,
            kv_usage=max(self.engine.kv_usage, 0.0),
            max_kv_tokens=self.engine.max_kv_tokens,
            recent_ttft_ms=self.recent_ttft_ms,
            recent_output_tokens=self.recent_output_tokens,
            draining=self.draining,
            updated_at=now_ms(),
        )
