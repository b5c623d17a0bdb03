"""Prompt-response records: what happened to each request, kept in Redis with a TTL.

One record per request, a serialized `RequestRecord` under
`strata:trace:{<tenant>}:<request id>` (the tenant in a hash tag, so a tenant's keys share a
Redis Cluster slot). Reads are scoped to the caller's tenant: another tenant's request id
reads as not found. Saving is best effort: a request never fails because its record could
not be kept. Records saved while a save is on its way go together, in one pipeline
(`Coalescer`).
"""

from __future__ import annotations

import logging
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from services.common.coalesce import Coalescer
from services.common.errors import RequestInvalid, TraceNotFound
from services.common.redis_state import redis_errors
from services.common.validation import check_request_id
from strata.orchestrator.v1 import traces_pb2

log = logging.getLogger(__name__)

MAX_BATCH = 100
"""The most records one pipeline carries."""


def record_key(tenant_id: str, request_id: str) -> str:
    """The Redis key of a tenant's record of a request."""
    return f"strata:trace:{{{tenant_id}}}:{request_id}"


class RecordStore:
    """Stores and reads request records, per tenant."""

    def __init__(self, client: redis.Redis, ttl_s: int, linger_s: float = 0.0) -> None:
        self._redis = client
        self._ttl_s = ttl_s
        self._saving: Coalescer[traces_pb2.RequestRecord, None] = Coalescer(
            self._save_one, self._save_many, MAX_BATCH, linger_s=linger_s
        )

    async def save(self, record: traces_pb2.RequestRecord) -> None:
        """Stores the record under its tenant and request id; never raises (logs instead)."""
        try:
            await self._saving.submit(record)
        except (RedisError, OSError) as err:
            log.warning("request record %s not saved (%s)", record.request_id, err)

    def flush(self, stop: bool = False) -> None:
        """Saves the records waiting for others to join them now; `stop`: from now on each
        goes without waiting (see Coalescer.flush)."""
        self._saving.flush(stop)

    async def _save_one(self, record: traces_pb2.RequestRecord) -> None:
        await self._set(self._redis, record)

    async def _save_many(self, records: list[traces_pb2.RequestRecord]) -> list[None]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for record in records:
                self._set(pipe, record)
            await pipe.execute()
        return [None] * len(records)

    def _set(self, target: Any, record: traces_pb2.RequestRecord) -> Any:
        """The record's SET on the client (awaitable) or queued on a pipeline."""
        return target.set(
            record_key(record.tenant_id, record.request_id),
            record.SerializeToString(),
            ex=self._ttl_s,
        )

    async def get(self, tenant_id: str, request_id: str) -> traces_pb2.RequestRecord:
        """The tenant's record of the request; raises TraceNotFound when there is none."""
        if violation := check_request_id(request_id):
            raise RequestInvalid([violation])
        with redis_errors():
            raw: Any = await self._redis.get(record_key(tenant_id, request_id))
        if raw is None:
            raise TraceNotFound(request_id)
        return traces_pb2.RequestRecord.FromString(raw)
