"""gRPC face of the cache service: proto in, `AnswerCache`, proto out."""

from __future__ import annotations

from typing import Any

import grpc

from services.cache.answers import AnswerCache
from services.common.admin import authorize, bearer, once
from services.common.errors import unary_handler
from strata.cache.v1 import cache_pb2, cache_pb2_grpc


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Implements strata.cache.v1.CacheService."""

    def __init__(self, cache: AnswerCache) -> None:
        self._cache = cache

    @unary_handler
    async def Lookup(
        self, request: cache_pb2.LookupRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.LookupResponse:
        return await self._cache.lookup(request)

    @unary_handler
    async def Store(
        self, request: cache_pb2.StoreRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.StoreResponse:
        return cache_pb2.StoreResponse(entry_id=await self._cache.store(request))

    @unary_handler
    async def StoreBatch(
        self, request: cache_pb2.StoreBatchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.StoreBatchResponse:
        return cache_pb2.StoreBatchResponse(
            entry_ids=await self._cache.store_batch(request.entries)
        )

    @unary_handler
    async def Audit(
        self, request: cache_pb2.AuditRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.AuditResponse:
        agreed, similarity = await self._cache.audit(request)
        return cache_pb2.AuditResponse(agreed=agreed, similarity=similarity)


class CacheAdminServicer(cache_pb2_grpc.CacheAdminServiceServicer):
    """Implements strata.cache.v1.CacheAdminService (admin token required)."""

    def __init__(self, cache: AnswerCache, token: str | None, client: Any) -> None:
        self._cache = cache
        self._token = token
        self._redis = client

    @unary_handler
    async def Invalidate(
        self, request: cache_pb2.InvalidateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.InvalidateResponse:
        authorize(self._token, bearer(context))

        async def apply() -> cache_pb2.InvalidateResponse:
            return cache_pb2.InvalidateResponse(removed=await self._cache.invalidate(request))

        return await once(
            self._redis,
            "strata:cache:admin",
            request.request_id,
            cache_pb2.InvalidateResponse,
            apply,
        )

    @unary_handler
    async def GetStats(
        self, request: cache_pb2.GetStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> cache_pb2.GetStatsResponse:
        authorize(self._token, bearer(context))
        return await self._cache.stats(request.tenant_id)
