"""The event loop a process runs on: uvloop unless its settings say `asyncio`.

uvloop (libuv under asyncio's API) runs the same gRPC calls on a little less CPU than the
standard loop (bench/grpc_hop.py here: about 4% on the server, 3% on the client, and the
round trip 5% shorter; more on the asyncio side of a process: sockets, timers, Redis);
the standard loop stays one setting away (`STRATA_<SERVICE>_EVENT_LOOP=asyncio`) for
debugging and for platforms without uvloop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, Literal, TypeVar

_T = TypeVar("_T")

Kind = Literal["uvloop", "asyncio"]


def factory(kind: Kind) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """What makes a loop of `kind` (None: the standard library's default)."""
    if kind == "asyncio":
        return None
    import uvloop

    return uvloop.new_event_loop


def run(main: Coroutine[Any, Any, _T], kind: Kind) -> _T:
    """`asyncio.run(main)` on a loop of `kind`."""
    with asyncio.Runner(loop_factory=factory(kind)) as runner:
        return runner.run(main)
