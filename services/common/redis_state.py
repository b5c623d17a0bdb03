"""The Redis client every stateful service uses: bounded calls, one pool per process.

Every command gives up after the service's `redis_timeout_s` (connecting included), so a
Redis that is down, paused or cut off costs a call tens to hundreds of milliseconds, never
a hang. A broken connection (Redis restarted, a connection reset) is dropped and the
command is sent once more on a fresh one, at once: a restarted Redis is used again by the
next call, with no restart of the service. A timed-out command is not sent again (it may
have run; the caller decides). `RedisOutage` lets a caller skip Redis for a moment after a
failure instead of having every request wait out the timeout.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.errors import DependencyUnavailable

log = logging.getLogger(__name__)

HEALTH_CHECK_INTERVAL_S = 30
"""A connection idle this long is pinged before use (a dead one is replaced)."""


class _BoundedWrite:
    """A connection whose writes are bounded by `asyncio.timeout`, not `asyncio.wait_for`.

    redis-py bounds each write (a command, a pipeline) with `asyncio.wait_for`, which on
    Python 3.11 loses a cancel that lands as the write completes (gh-86296, fixed in
    3.12): the caller's task goes on as though it had not been cancelled. A gRPC handler
    whose client cancelled then held its in-flight slot and went on to the model call until
    the call's deadline (about 1 fresh stack in 10 under load, in tests). `asyncio.timeout`
    counts cancels, so a cancel from outside always gets through; and it makes no task per
    command, as `wait_for` did."""

    socket_timeout: float | None

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        timeout = self.socket_timeout
        if timeout is None:
            await super().send_packed_command(command, check_health)  # type: ignore[misc]
            return
        # With no socket timeout redis-py writes directly; connecting and the health
        # check's PING, which it may do first, are inside the bound as before.
        self.socket_timeout = None
        try:
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)  # type: ignore[misc]
        except TimeoutError:
            # Cut wherever it was (connecting, the health check's PING, the write): the
            # connection may be part-way through an exchange, so it is not used again.
            await self.disconnect(nowait=True)  # type: ignore[attr-defined]
            raise RedisTimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout


_bounded_classes: dict[type, type] = {}


def _bounded_write(connection_class: type) -> type:
    """`connection_class` (TCP, TLS or Unix socket) with `_BoundedWrite`'s writes."""
    made = _bounded_classes.get(connection_class)
    if made is None:
        made = type(connection_class.__name__, (_BoundedWrite, connection_class), {})
        _bounded_classes[connection_class] = made
    return made


class _Pool(redis.BlockingConnectionPool):
    """redis-py's blocking pool with a short path, closed for good by `aclose()`.

    The short path: while no caller waits for a connection, a command takes an idle one and
    gives it back directly, without redis-py's condition, timer, deprecation check, release
    event and metrics hooks (none of which Strata uses: no credential provider, no
    redis-py observability). Skipping them: 164 -> 119 µs of CPU per GET, 251 -> 186 µs
    per two-command pipeline (`python -m bench.redis_pool`). A command that finds no idle
    connection, and every command while one waits, goes redis-py's way: it waits its turn,
    at most `timeout`, and each connection given back wakes a waiter.

    Closed for good: redis-py's pool goes on working after `aclose()`, so work that
    outlives a shutdown (a handler's clean-up after the server stopped, a command in flight
    that reconnects on its retry) would open connections that nothing closes (the pool
    holds its in-use connections weakly). Here such work fails as Redis unavailable, and a
    connection coming back to a closed pool is closed."""

    _closed = False
    _queued = 0
    """Commands on redis-py's path: while any is, no command takes the short one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connection_class = _bounded_write(self.connection_class)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self._closed:
            raise RedisConnectionError("the Redis client is closed")
        if self._available_connections and not self._queued and not self._in_maintenance:
            connection = self._available_connections.pop()
            self._in_use_connections.add(connection)
            try:
                await self.ensure_connection(connection)
            except BaseException:
                await self.release(connection)
                raise
            return connection
        self._queued += 1
        try:
            return await super().get_connection(*args, **kwargs)
        finally:
            self._queued -= 1

    async def release(self, connection: Any) -> None:
        if self._closed:
            await connection.disconnect(nowait=True)
        elif not self._queued and not connection.should_reconnect():
            self._in_use_connections.remove(connection)
            self._available_connections.append(connection)
            return
        await super().release(connection)

    async def aclose(self) -> None:
        self._closed = True
        await super().aclose()


def connect(url: str, timeout_s: float, max_connections: int = 64) -> redis.Redis:
    """A pooled client whose every command gives up after `timeout_s`.

    When all `max_connections` are in use, a command waits for one to come back (at most
    `timeout_s`) instead of failing: redis-py's default pool raises at once, which a burst
    of more concurrent commands than connections would turn into REDIS_UNAVAILABLE with a
    healthy Redis, and into a degraded service once RedisOutage counted enough of them."""
    pool = _Pool.from_url(
        url,
        timeout=timeout_s,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        max_connections=max_connections,
        health_check_interval=HEALTH_CHECK_INTERVAL_S,
        # redis-py's default retries 3 times with up to seconds of backoff, timeouts
        # included: a blackholed Redis would hold each call for many times its bound.
        retry=Retry(NoBackoff(), retries=1, supported_errors=(RedisConnectionError,)),
        decode_responses=False,
    )
    return redis.Redis.from_pool(pool)


_CANNOT_SERVE = (OutOfMemoryError, ReadOnlyError, MasterDownError, TryAgainError, ClusterDownError)
"""Replies of a Redis that is up but cannot do what was asked for now: out of memory under
`noeviction`, a replica since a failover, its primary gone, a cluster resharding or down."""
_CANNOT_SERVE_WORDS = re.compile(r"\b(MISCONF|BUSY)\b")
"""The same, without a class of their own in redis-py: writes refused while snapshots fail,
a script running too long."""


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turns Redis being unreachable, slow, or unable to serve for now (out of memory, a
    read-only replica, ...: `_CANNOT_SERVE`) into UNAVAILABLE/REDIS_UNAVAILABLE, as an
    outage: each service degrades as it does when Redis is down, instead of failing every
    request as an internal error."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError, *_CANNOT_SERVE) as err:
        raise DependencyUnavailable("redis") from err
    except ResponseError as err:
        if _CANNOT_SERVE_WORDS.search(str(err)):
            raise DependencyUnavailable("redis") from err
        raise


def queue_script(pipe: Any, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
    """Queues a Lua script on a pipeline by its sha alone.

    (Given a pipeline, redis-py's script object has the pipeline ask SCRIPT EXISTS before
    every execute: one more round trip per decision. `run_pipeline` loads the scripts when
    Redis lost them, instead.)"""
    pipe.evalsha(script.sha, len(keys), *keys, *args)


async def run_pipeline(
    client: redis.Redis,
    build: Callable[[Any], None],
    scripts: Sequence[AsyncScript],
    *,
    transaction: bool = False,
) -> list[Any]:
    """Builds a pipeline with `build` (scripts queued by `queue_script`) and runs it in one
    round trip. A Redis that lost the scripts (restarted, flushed, a new primary) answers
    NOSCRIPT: they are loaded and the pipeline runs again, once, so its other commands
    run twice then: queue only scripts and commands that may. Connection failures and
    timeouts raise DependencyUnavailable."""
    for attempt in range(2):
        async with client.pipeline(transaction=transaction) as pipe:
            build(pipe)
            try:
                with redis_errors():
                    replies: list[Any] = await pipe.execute()
                return replies
            except NoScriptError:
                if attempt:
                    raise
        with redis_errors():
            for script in scripts:
                await client.script_load(script.script)
    raise AssertionError("unreachable")


class RedisOutage:
    """Remembers that Redis keeps failing, so calls skip it for `retry_after_s` and take
    their degraded path at once; the first call after that tries Redis again (and so
    notices it is back). One slow command is not an outage: skipping starts after
    `failures` failed calls in a row. Process-local; a cheap check on the happy path."""

    def __init__(self, service: str, retry_after_s: float = 1.0, failures: int = 3) -> None:
        self._service = service
        self._retry_after_s = retry_after_s
        self._threshold = failures
        self._failures = 0
        self._skip_until = 0.0
        self._since: float | None = None

    @property
    def active(self) -> bool:
        """Whether Redis failed less than `retry_after_s` ago (skip it)."""
        return time.monotonic() < self._skip_until

    @property
    def ongoing(self) -> bool:
        """Whether the last call to Redis failed (and none answered since)."""
        return self._since is not None

    def failed(self) -> None:
        """A call to Redis failed or timed out."""
        now = time.monotonic()
        self._failures += 1
        if self._failures >= self._threshold:
            self._skip_until = now + self._retry_after_s
        if self._since is None:
            self._since = now
            log.warning("%s: Redis does not answer; degraded until it does", self._service)

    def answered(self) -> None:
        """A call to Redis succeeded."""
        self._failures = 0
        if self._since is not None:
            down_s = time.monotonic() - self._since
            log.warning("%s: Redis answers again after %.1f s", self._service, down_s)
            self._since = None
            self._skip_until = 0.0
