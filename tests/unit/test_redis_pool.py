"""The services' Redis client (services.common.redis_state.connect) on a real Redis: more
concurrent commands than connections wait for one instead of failing, within the bound."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from services.common.errors import DependencyUnavailable
from services.common.redis_state import connect, redis_errors


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
