"""A minimal virtual-time driver for engine tests: feeds arrivals, steps the engine, records times."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from lodestar.hashing import trace_block_hashes
from sim.engine import Engine, EngineRequest, Finished


def make_request(rid: str, prompt_len: int, arrival_s: float = 0.0, max_new_tokens: int = 32,
                 prefix_id: int | None = None, shared_blocks: int = 0, block_tokens: int = 16,
                 stop_after: int | None = None) -> EngineRequest:
    """A request whose first `shared_blocks` blocks are shared by every request with the same prefix_id."""
    n_blocks = prompt_len // block_tokens
    shared = min(shared_blocks, n_blocks)
    ids = [(prefix_id or 0) * 1_000_003 + i for i in range(shared)]
    ids += [zlib.crc32(f"{rid}:{i}".encode()) << 20 for i in range(shared, n_blocks)]
    return EngineRequest(rid, prompt_len, tuple(trace_block_hashes(ids)), block_tokens, max_new_tokens,
                         arrival_s, stop_after)


@dataclass
class RunLog:
    first_token_s: dict[str, float] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)
    finished: dict[str, Finished] = field(default_factory=dict)
    finish_s: dict[str, float] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    first_order: list[str] = field(default_factory=list)
    retracted: list[str] = field(default_factory=list)
    steps: int = 0
    iterations: int = 0


def run(engine: Engine, requests: list[EngineRequest], fuse: bool = True, check=None,
        max_steps: int = 1_000_000) -> RunLog:
    """Drive `engine` in virtual time until every request finished; `check(engine)` runs after each step."""
    pending = sorted(requests, key=lambda r: r.arrival_s)
    log = RunLog()
    now = 0.0
    i = 0
    while i < len(pending) or engine.has_work():
        while i < len(pending) and pending[i].arrival_s <= now:
            engine.add(pending[i], now)
            i += 1
        if not engine.has_work():
            now = pending[i].arrival_s
            continue
        until = pending[i].arrival_s if i < len(pending) else float("inf")
        out = engine.step(now, until=until if fuse else None)
        end = now + out.duration_s
        log.steps += 1
        log.iterations += out.iterations
        for ft in out.first_tokens:
            log.first_token_s[ft.rid] = end
            log.cached[ft.rid] = ft.cached_tokens
            log.first_order.append(ft.rid)
        for rid, n in out.tokens.items():
            log.tokens[rid] = log.tokens.get(rid, 0) + n
        for f in out.finished:
            log.finished[f.rid] = f
            log.finish_s[f.rid] = end
        log.retracted.extend(out.retracted)
        now = end
        if check is not None:
            check(engine)
        if log.steps > max_steps:
            raise AssertionError("engine did not drain")
    return log
