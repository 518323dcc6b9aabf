"""SGLang's POST /v1/score: the probabilities of some label tokens right after query + item, per item.

As SGLang does, each item is joined to the query (`query + item`, or `item + query` with `item_first`;
texts are joined as text, token ids as lists) and run as a prefill-only request; the score of label
token t for an item is P(t | that prompt), from the emulator's logprob model (`sim.emulator.logprobs`),
renormalized over the labels with `apply_softmax`. The answer is `{scores: [[...] per item], model,
usage: null, object: "scoring"}`; bad input is a 400 ErrorResponse (`type` "BadRequestError") with
SGLang's messages where it has them.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sim.emulator.emulator import MAX_BATCH, MAX_TOKEN_IDS_LOGPROB, Emulator, PreparedRequest
from sim.emulator.openai_api import DISCONNECTED, cache_salt, require_json
from sim.emulator.responses import error_response, json_response, read_json_object, wait_unless_disconnected
from sim.engine import QueueFull


def routes(emulator: Emulator) -> list[Route]:
    """The scoring route of one emulator."""
    return [Route("/v1/score", _Scoring(emulator).score, methods=["POST"])]


class _Scoring:
    def __init__(self, emulator: Emulator) -> None:
        self.emu = emulator

    async def score(self, request: Request) -> Response:
        """POST /v1/score."""
        received = time.perf_counter()
        require_json(request)
        body = await read_json_object(request)
        emu = self.emu
        try:
            labels = _labels(body.get("label_token_ids"), emu.card.vocab)
            prompts = _joined(body.get("query"), body.get("items"), bool(body.get("item_first")))
            salt = cache_salt(body)
            prepared: list[PreparedRequest] = [
                emu.prepare(p if isinstance(p, str) else None, p if isinstance(p, list) else None,
                            {"max_new_tokens": 0}, None, salt)
                for p in prompts
            ]
            gen = await emu.generate(prepared, received_wall=received)
        except QueueFull:
            emu.metrics.on_abort()
            return error_response("The request queue is full.", "SERVICE_UNAVAILABLE", 503)
        except ValueError as exc:
            return error_response(str(exc), "BadRequestError", 400)
        if not await wait_unless_disconnected(request, gen.wait):
            gen.abort(DISCONNECTED)
            return Response(status_code=499)
        last = np.asarray([p.input_ids[-1] for p in prepared], dtype=np.int64)
        wanted = np.asarray(labels, dtype=np.int64)
        lp = emu.logprobs.model.logprobs(np.repeat(last, len(wanted)), np.tile(wanted, len(last)))
        lp = lp.reshape(len(last), len(wanted))
        if body.get("apply_softmax"):
            weights = np.exp(lp - lp.max(axis=1, keepdims=True))
            scores = weights / weights.sum(axis=1, keepdims=True)
        else:
            scores = np.exp(lp)
        return json_response({"scores": scores.tolist(), "model": body.get("model", "default"), "usage": None,
                              "object": "scoring"})


def _labels(value: Any, vocab: int) -> list[int]:
    if not isinstance(value, list) or not value or len(value) > MAX_TOKEN_IDS_LOGPROB \
            or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise ValueError(f"label_token_ids must be a list of 1 to {MAX_TOKEN_IDS_LOGPROB} token ids.")
    for t in value:
        if not 0 <= t < vocab:
            raise ValueError(f"Token ID {t} is out of vocabulary (vocab size: {vocab})")
    return value


def _joined(query: Any, items: Any, item_first: bool) -> list[str | list[int]]:
    """The prompt of each item: text joined to text, token ids to token ids."""
    if isinstance(items, str):
        items = [items]
    if query is None or not isinstance(items, list) or not items:
        raise ValueError("query and items are required.")
    if len(items) > MAX_BATCH:
        raise ValueError(f"At most {MAX_BATCH} items can be scored at once.")
    if isinstance(query, str) and all(isinstance(i, str) for i in items):
        return [i + query if item_first else query + i for i in items]
    if _is_ids(query) and all(_is_ids(i) for i in items):
        return [i + query if item_first else query + i for i in items]
    raise ValueError("query and items must both be text or both be token ids.")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)
