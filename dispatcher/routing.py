"""Routing one batch of requests: pure and synchronous, so it is unit-testable without Kafka or Redis.

The prefix index is read once per batch (matched blocks of every request on every worker) before this
runs. Requests are then routed one after the other, each seeing the effect of the earlier ones on a
local copy of the view: the chosen worker's in-flight count and pending prefill grow, and the blocks a
request brings are matched on its worker by later requests of the same batch, so a burst sharing a
prefix is not all sent to one worker and the cache-aware policies see the prefixes the batch created.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from dispatcher.policies.base import Policy
from lodestar.cluster_view import ClusterView, RequestInfo
from lodestar.features import as_dict, chosen_features
from lodestar.hashing import text_block_hashes, token_block_hashes
from lodestar.schemas import InferenceRequest, RoutingDecision, now_ms
from lodestar.settings import PrefixSettings

# Without a tokenizer, a text prompt's token count is estimated at this many characters per token.
CHARS_PER_TOKEN = 4


def describe(request: InferenceRequest, prefix: PrefixSettings) -> RequestInfo:
    """The request as a router sees it: prompt length in tokens and its chained prefix block hashes.

    Token prompts use token blocks of `tokens_per_block`; text prompts use character blocks of
    `chars_per_block`, counted as `chars_per_block / CHARS_PER_TOKEN` tokens each.
    """
    if request.input_ids:
        return RequestInfo(
            request_id=request.request_id,
            prompt_tokens=len(request.input_ids),
            block_hashes=tuple(token_block_hashes(request.input_ids, prefix.tokens_per_block)),
            tokens_per_block=prefix.tokens_per_block,
            session_id=request.session_id,
            max_new_tokens=request.sampling.max_new_tokens,
        )
    text = request.prompt or ""
    return RequestInfo(
        request_id=request.request_id,
        prompt_tokens=max(1, math.ceil(len(text) / CHARS_PER_TOKEN)),
        block_hashes=tuple(text_block_hashes(text, prefix.chars_per_block)),
        tokens_per_block=max(1, prefix.chars_per_block // CHARS_PER_TOKEN),
        session_id=request.session_id,
        max_new_tokens=request.sampling.max_new_tokens,
    )


@dataclass(frozen=True, slots=True)
class Routed:
    """One request with the decision made for it."""

    request: InferenceRequest
    decision: RoutingDecision
    uncached_tokens: int
    index: int  # the request's position in the batch


@dataclass(frozen=True, slots=True)
class RouteFailure:
    """A request of the batch that could not be routed or published for a reason of its own."""

    index: int  # the request's position in the batch
    stage: str  # `route` or `publish`: the dead letter's stage
    error: Exception


@dataclass(slots=True)
class BatchPlan:
    """A routed batch: decisions in input order, per worker the block chains it will now cache, and the
    requests that failed on their own."""

    routed: list[Routed] = field(default_factory=list)
    inserts: dict[str, list[tuple[int, ...]]] = field(default_factory=dict)
    failed: list[RouteFailure] = field(default_factory=list)


def _extend_match(matched: int, hashes: Sequence[int], inserted: set[int]) -> int:
    """Extend a stored match by the leading blocks that earlier requests of this batch bring."""
    while matched < len(hashes) and hashes[matched] in inserted:
        matched += 1
    return matched


def _finite_or_none(value: float | None) -> float | None:
    """A model's prediction as a decision carries it: a non-finite one (a broken model) is no prediction."""
    return value if value is None or math.isfinite(value) else None


class BatchRouter:
    """Routes a batch with one policy, producing RoutingDecisions for the wire."""

    def __init__(self, policy: Policy, dispatcher_id: str):
        self.policy = policy
        self.dispatcher_id = dispatcher_id

    def route(
        self,
        requests: Sequence[InferenceRequest],
        infos: Sequence[RequestInfo],
        matched_blocks: np.ndarray,
        view: ClusterView,
        attempts: Sequence[int] | None = None,
    ) -> BatchPlan:
        """Route `requests` (with their `infos`) over `view`, which this call updates as it goes.

        `matched_blocks[j, i]` is the number of leading blocks of request j the prefix index holds for
        worker i. `attempts[j]` is the delivery attempt recorded in the decision (0 for first routing).
        """
        n_req, n_workers = len(requests), view.size
        if len(infos) != n_req or matched_blocks.shape != (n_req, n_workers):
            raise ValueError(
                f"{n_req} requests, {len(infos)} infos and matches of shape {matched_blocks.shape} "
                f"for {n_workers} workers do not line up"
            )
        if n_workers == 0 and n_req:
            raise ValueError("no worker to route to")
        inserted: dict[int, set[int]] = {}  # worker index -> blocks this batch brought there so far
        plan = BatchPlan()
        for j, (request, info) in enumerate(zip(requests, infos, strict=True)):
            try:
                blocks = matched_blocks[j].astype(np.float64)
                for i, brought in inserted.items():
                    blocks[i] = _extend_match(int(blocks[i]), info.block_hashes, brought)
                candidate_view = view.with_matched(blocks * info.tokens_per_block)
                choice = self.policy.choose(info, candidate_view)
                i = choice.index
                features = chosen_features(info, candidate_view, choice)
                matched_tokens = int(min(candidate_view.matched_prefix_tokens[i], max(info.prompt_tokens - 1, 0)))
                uncached = info.prompt_tokens - matched_tokens
                decision = RoutingDecision(
                    worker_id=view.worker_ids[i],
                    policy=choice.policy,
                    model_version=choice.model_version,
                    features=as_dict(features),
                    predicted_ttft_ms=_finite_or_none(choice.predicted_ttft_ms),
                    explored=choice.explored,
                    matched_prefix_tokens=matched_tokens,
                    dispatcher_id=self.dispatcher_id,
                    decided_at=now_ms(),
                    attempt=0 if attempts is None else attempts[j],
                )
            except Exception as exc:  # this request's own failure: the others are still routed
                plan.failed.append(RouteFailure(j, "route", exc))
                continue
            plan.routed.append(Routed(request, decision, uncached, j))
            view.inflight[i] += 1
            view.pending_prefill_tokens[i] += uncached
            if info.block_hashes:
                inserted.setdefault(i, set()).update(info.block_hashes)
                plan.inserts.setdefault(view.worker_ids[i], []).append(info.block_hashes)
        return plan
