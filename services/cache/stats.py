"""Cache counters per tenant: kept in memory on the hot path, added to Redis every second.

`strata:cache:stats:<tenant>` holds exact_hits, semantic_hits, misses, stores, audits,
audit_disagreements and guard:<name> (close candidates a guard refused).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, defaultdict
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from services.common.errors import StrataError
from services.common.redis_state import redis_errors

log = logging.getLogger(__name__)


def stats_key(tenant_id: str) -> str:
    """Where a tenant's counters live."""
    return f"strata:cache:stats:{tenant_id}"


class CacheStats:
    """Counts in memory; `flush` adds the counts to Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._pending: defaultdict[str, Counter[str]] = defaultdict(Counter)

    def count(self, tenant_id: str, name: str, amount: int = 1) -> None:
        """Adds to a counter (no I/O)."""
        self._pending[tenant_id][name] += amount

    async def flush(self) -> None:
        """Adds the pending counts to Redis; kept for the next flush if Redis fails."""
        if not self._pending:
            return
        pending, self._pending = self._pending, defaultdict(Counter)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for tenant_id, counts in pending.items():
                    for name, amount in counts.items():
                        pipe.hincrby(stats_key(tenant_id), name, amount)
                with redis_errors():
                    await pipe.execute()
        except StrataError:
            for tenant_id, counts in pending.items():
                self._pending[tenant_id].update(counts)
            raise

    async def read(self, tenant_id: str) -> dict[str, int]:
        """The tenant's counters as stored."""
        with redis_errors():
            raw: Any = await self._redis.hgetall(stats_key(tenant_id))
        return {k.decode(): int(v) for k, v in raw.items()}

    async def run(self, interval_s: float = 1.0) -> None:
        """Flushes forever. A command Redis refuses for its content (a key of the wrong type)
        loses its own count only, not the others of the flush nor the flushes after."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush()
            except StrataError as err:
                log.warning("cache stats not written (%s); kept for later", err.reason)
            except RedisError as err:
                log.error("cache stats partly not written (%s)", str(err)[:200])
