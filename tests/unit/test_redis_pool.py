"""The services' Redis client (services.common.redis_state.connect) on a real Redis: more
concurrent commands than connections wait for one instead of failing, within the bound; a
closed client leaves no connection open, whatever was in flight or came after."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import redis
import redis.asyncio

from services.common.errors import DependencyUnavailable
from services.common.redis_state import connect, redis_errors
from strata_cli.devstack import PrivateRedis


async def test_more_concurrent_commands_than_connections_all_answer(
    redis_url: str, redis_db: redis.Redis
) -> None:
    client = connect(redis_url, timeout_s=2.0, max_connections=2)
    try:
        # Each BLPOP holds its connection for 50 ms on the server (nothing to pop): twelve at
        # once through two connections take turns.
        with redis_errors():
            popped = await asyncio.gather(
                *(client.blpop([f"strata:test:empty:{n}"], timeout=0.05) for n in range(12))
            )
    finally:
        await client.aclose()
    assert popped == [None] * 12


async def test_a_command_waits_for_a_connection_at_most_the_timeout(
    redis_url: str, redis_db: redis.Redis
) -> None:
    client = connect(redis_url, timeout_s=0.3, max_connections=1)
    try:
        held = await client.connection_pool.get_connection()
        began = time.monotonic()
        with pytest.raises(DependencyUnavailable), redis_errors():
            await client.ping()
        waited = time.monotonic() - began
        await client.connection_pool.release(held)
        with redis_errors():
            assert await client.ping()
    finally:
        await client.aclose()
    # Bounded by the timeout, not failed at once (and not held for a retry's backoff).
    assert 0.25 <= waited < 1.5


async def _awaited(command: Awaitable[Any]) -> Any:
    return await command


def _connections_left_open(pool: redis.asyncio.ConnectionPool) -> list[object]:
    """Connections of `pool` that still hold a socket (the in-use ones are held weakly)."""
    return [c for c in [*pool._available_connections, *pool._in_use_connections] if c.is_connected]


async def test_a_closed_client_opens_no_connection(redis_url: str, redis_db: redis.Redis) -> None:
    # Work that outlives a service's shutdown (a handler's clean-up after the server stopped)
    # must not open a connection that nothing will close: it fails as Redis unavailable.
    client = connect(redis_url, timeout_s=2.0)
    with redis_errors():
        assert await client.ping()
    await client.aclose()
    with pytest.raises(DependencyUnavailable), redis_errors():
        await client.set("strata:test:late", b"1")
    assert _connections_left_open(client.connection_pool) == []
    assert redis_db.get("strata:test:late") is None


async def test_a_command_in_flight_when_the_client_closes_leaves_no_connection_open(
    redis_url: str, redis_db: redis.Redis
) -> None:
    client = connect(redis_url, timeout_s=2.0)
    # The BLPOP waits 300 ms on the server; closing the client cuts its connection, and the
    # retry on a broken connection would connect it again.

    async def pop() -> None:
        with contextlib.suppress(redis.RedisError):
            await client.blpop(["strata:test:empty"], timeout=0.3)

    waiting = asyncio.create_task(pop())
    await asyncio.sleep(0.05)
    await client.aclose()
    await waiting
    assert _connections_left_open(client.connection_pool) == []


async def test_commands_one_after_another_share_one_connection(
    redis_url: str, redis_db: redis.Redis
) -> None:
    client = connect(redis_url, timeout_s=2.0)
    try:
        with redis_errors():
            ids = {await client.client_id() for _ in range(5)}
    finally:
        await client.aclose()
    assert len(ids) == 1


async def test_a_connection_given_back_goes_to_the_command_waiting_for_it(
    redis_url: str, redis_db: redis.Redis
) -> None:
    client = connect(redis_url, timeout_s=2.0, max_connections=1)
    try:
        held = await client.connection_pool.get_connection()
        waiting = asyncio.create_task(_awaited(client.set("strata:test:waited", b"1")))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        await client.connection_pool.release(held)
        # A command that comes after the waiter, with the one connection just given back:
        # it takes its turn behind the waiter instead of taking the connection first.
        later = asyncio.create_task(_awaited(client.get("strata:test:waited")))
        with redis_errors():
            async with asyncio.timeout(2):
                assert await waiting
                assert await later == b"1"
    finally:
        await client.aclose()


async def test_a_cancel_that_lands_as_a_command_is_written_gets_through(
    redis_url: str, redis_db: redis.Redis
) -> None:
    # redis-py bounds writes with asyncio.wait_for, which on Python 3.11 drops a cancel that
    # lands as the write completes: the caller went on as if never cancelled (a gRPC
    # handler whose client had cancelled went on to the model call). A cancel at each loop
    # turn after the command starts covers the moment of the write.
    client = connect(redis_url, timeout_s=2.0)
    lost = []
    try:
        with redis_errors():
            await client.ping()
        for turns in range(12):
            task = asyncio.create_task(_set(client, "strata:test:cancelled"))
            for _ in range(turns):
                await asyncio.sleep(0)
            finished_before = task.done()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not (task.cancelled() or finished_before):
                lost.append(turns)
            await asyncio.sleep(0.01)  # the connection back in the pool
    finally:
        await client.aclose()
    assert lost == [], f"cancels lost at loop turns {lost}"


async def _set(client: redis.asyncio.Redis, key: str) -> None:
    await client.set(key, b"1")


async def test_a_write_that_cannot_go_out_fails_within_the_bound() -> None:
    # A peer that answers the connection's set-up and then reads nothing more: a large
    # command fills the socket buffers and its write blocks until the timeout.
    transports: list[asyncio.Transport] = []

    class Answering(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transports.append(transport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            commands = data.count(b"\r\n*") + data.startswith(b"*")
            self.transport.write(b"+OK\r\n" * commands)

    server = await asyncio.get_running_loop().create_server(Answering, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = connect(f"redis://127.0.0.1:{port}/0", timeout_s=0.3)
    try:
        with redis_errors():
            await client.ping()
        for transport in transports:
            transport.pause_reading()
        began = time.monotonic()
        with pytest.raises(DependencyUnavailable), redis_errors():
            await client.set("strata:test:large", b"x" * (64 << 20))
        waited = time.monotonic() - began
        # The cut connection is not given to the next command.
        assert _connections_left_open(client.connection_pool) == []
    finally:
        await client.aclose()
        for transport in transports:
            transport.abort()
        server.close()
    assert 0.25 <= waited < 2.0


async def test_a_redis_that_cannot_serve_for_now_is_unavailable_not_an_error(
    redis_url: str, redis_db: redis.Redis, tmp_path: Path
) -> None:
    """A replica refuses writes (READONLY: a client still on a primary demoted by a
    failover) and a Redis refusing writes while its snapshots fail (MISCONF): the caller
    sees Redis unavailable, as in an outage. A command Redis refuses for its own content
    (WRONGTYPE) stays the error it is."""
    replica = PrivateRedis(tmp_path / "replica").start()
    primary = urlparse(redis_url)
    plain = redis.Redis.from_url(replica.url)
    client = connect(replica.url, timeout_s=2.0)
    try:
        plain.replicaof(primary.hostname, primary.port)
        with pytest.raises(DependencyUnavailable), redis_errors():
            await client.set("strata:test:replica", "x")
        plain.replicaof("NO", "ONE")
        plain.config_set("stop-writes-on-bgsave-error", "yes")
        plain.config_set("save", "3600 1")  # (writes stop only where snapshots are on)
        (tmp_path / "replica" / "dump.rdb").mkdir()  # a snapshot cannot be written there
        with contextlib.suppress(redis.ResponseError):
            plain.bgsave()
        await_misconf = time.monotonic() + 5
        while plain.info("persistence")["rdb_last_bgsave_status"] != "err":
            assert time.monotonic() < await_misconf
            await asyncio.sleep(0.05)
        with pytest.raises(DependencyUnavailable) as caught, redis_errors():
            await client.set("strata:test:misconf", "x")
        assert "MISCONF" in str(caught.value.__cause__)
        plain.config_set("stop-writes-on-bgsave-error", "no")
        await client.set("strata:test:wrongtype", "x")
        with pytest.raises(redis.ResponseError, match="WRONGTYPE"), redis_errors():
            await client.hincrby("strata:test:wrongtype", "n", 1)
    finally:
        await client.aclose()
        plain.close()
        replica.stop()
