"""gRPC face of the cache service: proto in, `ExactCache`, proto out."""

from __future__ import annotations

from typing import Any

import grpc

from services.cache.exact import ExactCache
from services.common.errors import unary_handler
from strata.cache.v1 import cache_pb2, cache_pb2_grpc


class CacheServicer(cache_pb2_grpc.CacheServiceServicer):
    """Implements strata.cache.v1.CacheService."""

    def __init__(self, cache: ExactCache) -> None:
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
