"""Shared pieces of the benchmarks: a Redis to use, a service served in a thread."""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from services.common import logs
from services.common.bootstrap import RunningServer, Service, start
from services.common.settings import ServiceSettings
from strata_cli.devstack import PrivateRedis, redis_answers

BENCH_DB = 14
_S = TypeVar("_S", bound=ServiceSettings)


@contextmanager
def bench_redis() -> Iterator[str]:
    """$STRATA_BENCH_REDIS_URL, else db 14 of the local Redis, else a private redis-server."""
    explicit = os.environ.get("STRATA_BENCH_REDIS_URL")
    local = f"redis://127.0.0.1:6379/{BENCH_DB}"
    if explicit:
        yield explicit
    elif redis_answers(local):
        yield local
    else:
        with tempfile.TemporaryDirectory() as directory:
            server = PrivateRedis(Path(directory)).start()
            try:
                yield server.url
            finally:
                server.stop()


@contextmanager
def served(settings: _S, build: Callable[[_S], Awaitable[Service]]) -> Iterator[str]:
    """Runs a service (built as in production) on its own event loop thread; yields host:port."""
    logs.configure("bench", "WARNING")
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def boot() -> RunningServer:
        return await start(settings, await build(settings))

    running = asyncio.run_coroutine_threadsafe(boot(), loop).result(120)
    try:
        yield running.address
    finally:
        asyncio.run_coroutine_threadsafe(running.stop(0), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def percentile(values: Sequence[float], share: float) -> float:
    """The `share` quantile (0..1) of the values."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[int(share * 1000) - 1]
