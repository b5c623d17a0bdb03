"""The cache's counters: flushed to Redis in the background, and the flusher outlives a
command Redis refuses."""

from __future__ import annotations

import asyncio

import redis

from services.cache.stats import CacheStats, stats_key
from services.common.redis_state import connect
from tests.helpers import eventually


async def test_a_refused_counter_loses_its_own_count_and_the_flushes_go_on(
    redis_url: str, redis_db: redis.Redis
) -> None:
    """One tenant's counters key holds a string (WRONGTYPE for its HINCRBY): the other
    tenants' counts of the same flush land, and so do the next flushes'."""
    redis_db.set(stats_key("broken"), "not a hash")
    client = connect(redis_url, 1.0)
    stats = CacheStats(client)
    flusher = asyncio.create_task(stats.run(interval_s=0.02))
    try:
        stats.count("acme", "misses", 2)
        stats.count("broken", "misses", 1)
        await eventually(lambda: redis_db.hget(stats_key("acme"), "misses") == b"2")
        stats.count("acme", "exact_hits", 5)
        await eventually(lambda: redis_db.hget(stats_key("acme"), "exact_hits") == b"5")
        assert not flusher.done()
    finally:
        flusher.cancel()
        await client.aclose()
    assert redis_db.get(stats_key("broken")) == b"not a hash"
