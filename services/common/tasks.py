"""Stopping background tasks for sure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

log = logging.getLogger(__name__)


async def cancel_and_wait(task: asyncio.Task[object], timeout_s: float = 5.0) -> None:
    """Cancels a task and waits for it to end, cancelling again if it swallowed a cancel.

    (On Python 3.11 a cancel that lands just as an `asyncio.wait_for` completes can be
    lost, and a loop that catches its own errors would then run on.)
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=min(0.1, max(0.0, deadline - loop.time())))
        if loop.time() >= deadline:
            log.warning("task %s did not stop in %.1fs", task.get_name(), timeout_s)
            return
    if not task.cancelled() and task.exception() is not None:
        log.warning("task %s ended with %r", task.get_name(), task.exception())


class Background:
    """Work that goes on after the reply (settlements, stores, audits): kept referenced
    while it runs, and awaited at shutdown."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Future[None]] = set()

    def run(self, work: Awaitable[None]) -> asyncio.Future[None]:
        """Starts `work`; it runs to its end even when whoever started it is cancelled."""
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def drain(self) -> None:
        """Waits for the work still running, and for work it starts meanwhile (a settlement
        that then saves its record); errors were logged where they arose."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
