"""Wires the cache service: settings → Redis → exact cache → servicer."""

from __future__ import annotations

import grpc

from services.cache.exact import ExactCache
from services.cache.servicer import CacheServicer
from services.cache.settings import CacheSettings
from services.common.bootstrap import Service
from services.common.redis_state import connect
from strata.cache.v1 import cache_pb2, cache_pb2_grpc

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name


async def build(settings: CacheSettings) -> Service:
    """The cache service, ready for `bootstrap.start`."""
    client = connect(settings.redis_url, settings.redis_timeout_s)
    cache = ExactCache(client, settings.default_ttl_s, settings.max_ttl_s)
    servicer = CacheServicer(cache)

    def register(server: grpc.aio.Server) -> None:
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)

    return Service(
        name="cache",
        register=register,
        service_names=[SERVICE_NAME],
        probes={"redis": cache.ping},
        close=client.aclose,
    )
