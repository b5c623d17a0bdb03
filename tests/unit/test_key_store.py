"""Control's key store (services.control.keys.KeyStore) on a real Redis: concurrent requests
of a key share one read, and a read that a change overtook is not cached."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis
import redis.asyncio

from services.common.errors import ApiKeyInvalid
from services.common.redis_state import connect
from services.control.keys import EVENTS_CHANNEL, KeyRecord, KeyStore, new_key, record_key


@pytest.fixture
async def store(redis_url: str, redis_db: redis.Redis) -> AsyncIterator[KeyStore]:
    client = connect(redis_url, 2.0)
    made = KeyStore(client, "default")
    made.start()
    try:
        yield made
    finally:
        await made.stop()
        await client.aclose()


def record_reads(redis_db: redis.Redis) -> int:
    stats: Any = redis_db.info("commandstats")
    return int(stats.get("cmdstat_hgetall", {}).get("calls", 0))


async def test_a_burst_of_a_key_not_cached_reads_it_once(
    store: KeyStore, redis_db: redis.Redis
) -> None:
    key, digest = new_key()
    await store.put(digest, "acme", "k1", "", "default", active=True)
    before = record_reads(redis_db)
    records = await asyncio.gather(*(store.authenticate(key) for _ in range(50)))
    assert {r.key_id for r in records} == {"k1"}
    assert record_reads(redis_db) - before == 1
    # Unknown keys too: one read, every caller refused.
    stranger, _ = new_key()
    before = record_reads(redis_db)
    refused = await asyncio.gather(
        *(store.authenticate(stranger) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(r, ApiKeyInvalid) for r in refused)
    assert record_reads(redis_db) - before == 1


async def test_a_read_overtaken_by_a_revocation_is_not_cached(
    store: KeyStore, redis_url: str, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The read began before the key was revoked on another replica and ended after the
    announcement: its caller may pass; a request that came after the announcement, or
    after the read, must not."""
    key, digest = new_key()
    marker, marker_digest = new_key()  # a key whose announcement comes right after
    other = connect(redis_url, 2.0)
    try:
        writer = KeyStore(other, "default")  # another replica
        await writer.put(digest, "acme", "k1", "", "default", active=True)
        await writer.put(marker_digest, "acme", "k2", "", "default", active=True)
    finally:
        await other.aclose()
    await store.authenticate(marker)
    read, revoked = asyncio.Event(), asyncio.Event()
    load = store._load

    async def slow_load(wanted: str) -> KeyRecord | None:
        record = await load(wanted)
        read.set()
        await revoked.wait()
        return record

    monkeypatch.setattr(store, "_load", slow_load)
    racing = asyncio.create_task(store.authenticate(key))
    await read.wait()
    # Another replica revokes the key: it writes the record and announces the change.
    redis_db.hset(record_key(digest), "state", "revoked")
    redis_db.publish(EVENTS_CHANNEL, digest)
    redis_db.publish(EVENTS_CHANNEL, marker_digest)
    async with asyncio.timeout(5):
        while store.known(marker_digest):  # announcements are handled in order
            await asyncio.sleep(0.01)
    late = asyncio.create_task(store.authenticate(key))  # after it: does not share the read
    revoked.set()
    assert (await racing).key_id == "k1"  # read before the revocation
    with pytest.raises(ApiKeyInvalid):
        await late
    monkeypatch.setattr(store, "_load", load)
    with pytest.raises(ApiKeyInvalid):
        await store.authenticate(key)
