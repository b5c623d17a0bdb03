"""Idempotency keys and single flight (services.orchestrator.idempotency) on a real Redis,
when Redis answers late: one slow answer in a burst is not an outage.

A Redis "answering late" here is the services' own client with one connection, held by the
test: a command then waits for it and times out at the client's bound, as it does when a
loaded event loop or a busy Redis answers after the timeout."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import redis
import redis.asyncio
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.calls import Deadline
from services.common.errors import DependencyUnavailable
from services.common.redis_state import connect
from services.orchestrator.idempotency import (
    WAITING_FAILURES,
    FlightClaim,
    IdempotencyStore,
    SingleFlight,
)
from strata.orchestrator.v1 import orchestrator_pb2

TIMEOUT_S = 0.1
"""The Redis bound of the slow side's client."""


@asynccontextmanager
async def client(redis_url: str, timeout_s: float = 2.0) -> AsyncIterator[redis.asyncio.Redis]:
    made = connect(redis_url, timeout_s, max_connections=1)
    try:
        yield made
    finally:
        await made.aclose()


@asynccontextmanager
async def stalled(made: redis.asyncio.Redis) -> AsyncIterator[None]:
    """Every command of `made` times out while the block runs (its one connection is held)."""
    held = await made.connection_pool.get_connection()
    try:
        yield
    finally:
        await made.connection_pool.release(held)


async def test_a_waiting_repeat_outlasts_redis_answering_late(
    redis_url: str, redis_db: redis.Redis
) -> None:
    request_id, answer = uuid.uuid4().hex, orchestrator_pb2.GenerateResponse(text="once")
    async with client(redis_url) as fast, client(redis_url, TIMEOUT_S) as slow:
        first = IdempotencyStore(fast)
        lease = await first.claim("acme", request_id, "digest", Deadline.after(5))
        assert isinstance(lease, bytes)
        repeat = asyncio.create_task(
            IdempotencyStore(slow).claim("acme", request_id, "digest", Deadline.after(5))
        )
        await asyncio.sleep(0.05)  # it waits for the first
        async with stalled(slow):
            # At least one of its polls times out; fewer than WAITING_FAILURES in a row.
            await asyncio.sleep(1.5 * TIMEOUT_S)
            assert not repeat.done()
        await first.complete("acme", request_id, "digest", answer)
        assert await asyncio.wait_for(repeat, 5) == answer


async def test_a_claim_whose_reply_was_lost_is_this_calls(
    redis_url: str, redis_db: redis.Redis
) -> None:
    """The SET that claims the id ran, but its reply timed out: trying again finds the
    call's own lease instead of waiting for it to lapse."""
    request_id = uuid.uuid4().hex
    async with client(redis_url) as made:
        real_set: Callable[..., Awaitable[Any]] = made.set

        async def set_then_lose_the_reply(*args: Any, **kwargs: Any) -> Any:
            made.set = real_set  # type: ignore[method-assign]
            await real_set(*args, **kwargs)
            raise RedisTimeoutError("the reply came after the bound")

        made.set = set_then_lose_the_reply  # type: ignore[method-assign]
        store = IdempotencyStore(made, lease_s=30)
        async with asyncio.timeout(2):
            lease = await store.claim("acme", request_id, "digest", Deadline.after(5))
    assert isinstance(lease, bytes)
    assert redis_db.get(f"strata:idem:{{t:acme}}:{request_id}") == lease


async def test_a_claim_fails_closed_when_redis_keeps_answering_late(
    redis_url: str, redis_db: redis.Redis
) -> None:
    async with client(redis_url, TIMEOUT_S) as slow, stalled(slow):
        began = time.monotonic()
        with pytest.raises(DependencyUnavailable):
            await IdempotencyStore(slow).claim("acme", "r-1", "digest", Deadline.after(5))
        assert time.monotonic() - began >= WAITING_FAILURES * TIMEOUT_S


async def test_single_flight_without_redis_lets_the_call_make_its_own(
    redis_url: str, redis_db: redis.Redis
) -> None:
    async with (
        client(redis_url, TIMEOUT_S) as slow,
        stalled(slow),
        SingleFlight(slow).leader("acme", "k-1", Deadline.after(5)) as leads,
    ):
        assert leads


async def test_a_single_flight_waiter_that_loses_redis_stops_waiting(
    redis_url: str, redis_db: redis.Redis
) -> None:
    """It goes on (looks in the cache, else makes its own call) instead of failing, and
    instead of waiting out the leader."""

    async def follows() -> bool:
        async with SingleFlight(slow).leader("acme", "k-2", Deadline.after(5)) as leads:
            return leads

    async with (
        client(redis_url) as fast,
        client(redis_url, TIMEOUT_S) as slow,
        SingleFlight(fast).leader("acme", "k-2", Deadline.after(5)) as leads,
    ):
        assert leads
        waiter = asyncio.create_task(follows())
        await asyncio.sleep(0.05)  # it waits for the leader
        async with stalled(slow):
            assert await asyncio.wait_for(waiter, 2) is False
        assert redis_db.exists("strata:flight:{t:acme}:k-2")


async def withdrawn(flight: SingleFlight, claim: FlightClaim) -> None:
    giving_back = flight.withdraw(claim)
    assert giving_back is not None
    await asyncio.wait_for(giving_back, 2)


async def test_a_withdrawn_flight_claim_frees_its_own_lock_only(
    redis_url: str, redis_db: redis.Redis
) -> None:
    async with client(redis_url) as made:
        flight = SingleFlight(made)
        first, second = flight.claim("acme", "k-3"), flight.claim("acme", "k-3")
        assert await first.leads and not await second.leads
        await withdrawn(flight, second)
        assert redis_db.get(first.key) == first.token
        await withdrawn(flight, first)
        assert not redis_db.exists(first.key)


async def test_a_leader_given_a_claim_holds_that_claim_s_lock_until_it_ends(
    redis_url: str, redis_db: redis.Redis
) -> None:
    async with client(redis_url) as made:
        flight = SingleFlight(made)
        claim = flight.claim("acme", "k-4")
        async with flight.leader("acme", "k-4", Deadline.after(5), claim) as leads:
            assert leads and redis_db.get(claim.key) == claim.token
        assert not redis_db.exists(claim.key)
