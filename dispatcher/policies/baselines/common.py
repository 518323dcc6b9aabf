"""What the baselines share: the meaning of "load", seeded tie-breaking, and building a Decision.

Load. The anchors' routers (SGLang's `worker.load()`, AIBrix's gateway-tracked running requests) count
the requests they sent to a worker and that have not finished. In a ClusterView that is `inflight`
(requests assigned to the worker and not completed, including those the worker has not reported yet);
`outstanding_requests` never lets it fall below what the engine itself reports (running + waiting),
which guards against an in-flight count that lags the engine's.

Scores. Every Decision carries per-worker `scores` where higher is preferred: cost-based rules store the
negated cost, so a consumer can always read the choice as an argmax of the rule's own quantity.

Ties. The anchors break exact ties at random; here that randomness comes from the policy's own seeded
`random.Random`, so a run is reproducible. Selection works on Python lists (for up to 64 workers that is
faster than numpy's per-call overhead), or on the array a policy computed its costs in
(`argmin_random_tie_array`: no conversion to a list, which costs more than the selection).
"""

from __future__ import annotations

import random

import numpy as np

from lodestar.cluster_view import ClusterView, Decision


def outstanding_requests(view: ClusterView) -> np.ndarray:
    """Requests each worker has accepted and not finished (the anchors' request-count load)."""
    return np.maximum(view.inflight, view.running + view.waiting)


def matched_blocks(view: ClusterView, tokens_per_block: int) -> np.ndarray:
    """The request's matched prefix per worker in whole blocks (the prefix index's unit)."""
    return np.floor_divide(view.matched_prefix_tokens, max(tokens_per_block, 1))


def argmin_random_tie(values: list[float], rng: random.Random) -> int:
    """Index of the smallest value; among equal smallest, one drawn uniformly with `rng`."""
    best = min(values)
    ties = [i for i, x in enumerate(values) if x == best]
    return ties[0] if len(ties) == 1 else ties[rng.randrange(len(ties))]


def argmin_random_tie_array(values: np.ndarray, rng: random.Random) -> int:
    """`argmin_random_tie` of a numpy array, without converting it to a list (cheaper from ~50 workers on):
    the same index and the same draw from `rng`; an array with a NaN goes through `argmin_random_tie`."""
    i = int(values.argmin())  # the first smallest, or the first NaN
    best = values[i]
    if best != best:
        return argmin_random_tie(values.tolist(), rng)
    ties = values == best
    if np.count_nonzero(ties) == 1:
        return i
    ties_at = np.flatnonzero(ties)
    return int(ties_at[rng.randrange(len(ties_at))])


def argmax_random_tie(values: list[float], rng: random.Random) -> int:
    """Index of the largest value; among equal largest, one drawn uniformly with `rng`."""
    best = max(values)
    ties = [i for i, x in enumerate(values) if x == best]
    return ties[0] if len(ties) == 1 else ties[rng.randrange(len(ties))]


def decide(policy: str, view: ClusterView, index: int, scores: np.ndarray) -> Decision:
    """The Decision for choosing worker `index` of `view` (scores: higher is preferred)."""
    return Decision(index=index, worker_id=view.worker_ids[index], policy=policy, scores=scores)


def require_workers(view: ClusterView) -> None:
    """Fail loudly on an empty cluster: there is nothing to choose from."""
    if view.size == 0:
        raise ValueError("cannot route: the cluster view has no workers")
