"""How the long-running services' commands run their main coroutine: on uvloop.

The services spend much of their CPU in the event loop itself (waking on sockets, running callbacks: a third
to two fifths of the gateway's and the dispatcher's samples under py-spy). uvloop runs the same asyncio code
on libuv and measurably cheaper (docs/gateway.md, "Measure"). The emulator keeps the standard loop: it stands
for the engine, whose timing it models.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def run_service(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to completion on a fresh uvloop event loop (as asyncio.run does with the default loop)."""
    return uvloop.run(main)
