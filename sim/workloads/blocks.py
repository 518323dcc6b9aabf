"""Prefix block chains for synthetic prompts described by nested content layers.

A synthetic prompt is a stack of layers, each a run of tokens named by a key: e.g. a group's system
prompt (shared) followed by a request's question (unique), or a session's growing conversation. A
layer's key must determine its content *and everything before it* (a question key belongs to one
request, a session key to one session). Block b then gets the id (key of the layer holding the block's
last token, b): equal ids mean equal block content at equal position, and the chain built from the ids
by `lodestar.hashing.trace_block_hashes` has the prefix property.
"""

from __future__ import annotations

from collections.abc import Sequence

from lodestar.hashing import trace_block_hashes

_MASK64 = (1 << 64) - 1


def layered_block_hashes(layers: Sequence[tuple[int, int]], prompt_len: int, block_tokens: int) -> tuple[int, ...]:
    """Chained hashes of the whole blocks of a prompt made of `(key, end_token)` layers, ends increasing.

    Tokens past the last layer's end belong to the last layer.
    """
    n_blocks = prompt_len // block_tokens
    ids: list[int] = []
    layer = 0
    last = len(layers) - 1
    for b in range(n_blocks):
        block_end = (b + 1) * block_tokens
        while layer < last and layers[layer][1] < block_end:
            layer += 1
        ids.append(hash((layers[layer][0], b)) & _MASK64)
    return tuple(trace_block_hashes(ids))
