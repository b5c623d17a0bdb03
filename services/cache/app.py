"""Wires the cache service: settings → Redis, embedder, vector index → answer cache."""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from services.cache.answers import AnswerCache, CachePolicy
from services.cache.executor_embeddings import ExecutorEmbedder
from services.cache.servicer import CacheAdminServicer, CacheServicer
from services.cache.settings import CacheSettings
from services.cache.stats import CacheStats
from services.cache.vectors import EdgeIndex, QdrantIndex, VectorIndex
from services.common.bootstrap import Service, answered_once
from services.common.embeddings import Embedder, LocalEmbedder
from services.common.redis_state import connect
from services.common.security import Trust
from services.common.settings import ConfigError
from services.common.tasks import cancel_and_wait
from strata.cache.v1 import cache_pb2, cache_pb2_grpc

SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheService"].full_name
ADMIN_SERVICE_NAME = cache_pb2.DESCRIPTOR.services_by_name["CacheAdminService"].full_name


async def _embedder(settings: CacheSettings) -> Embedder:
    if settings.embedder == "executor":
        if not settings.executor_address or not settings.embedding_model:
            raise ConfigError(
                "the executor embedder needs STRATA_CACHE_EXECUTOR_ADDRESS and "
                "STRATA_CACHE_EMBEDDING_MODEL"
            )
        return ExecutorEmbedder(
            settings.executor_address,
            settings.embedding_model,
            settings.embedding_dimensions,
            Trust.of(settings),
        )
    # Loading and verifying the model takes a moment: keep the event loop free meanwhile.
    return await asyncio.to_thread(LocalEmbedder, threads=settings.embed_threads)


async def _index(settings: CacheSettings, dimensions: int) -> VectorIndex:
    if settings.vector_backend == "qdrant":
        if not settings.qdrant_url:
            raise ConfigError("the qdrant vector backend needs QDRANT_URL")
        key = settings.qdrant_api_key.get_secret_value() if settings.qdrant_api_key else None
        if settings.qdrant_url == ":memory:":  # qdrant-client's local mode (tests, demos)
            index = QdrantIndex(dimensions, location=":memory:")
        else:
            index = QdrantIndex(dimensions, url=settings.qdrant_url, api_key=key)
        await index.start()
        return index
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return await asyncio.to_thread(EdgeIndex, settings.data_dir / "vectors", dimensions)


async def build(settings: CacheSettings) -> Service:
    """The cache service, ready for `bootstrap.start`."""
    client = connect(settings.redis_url, settings.redis_timeout_s)
    embedder = await _embedder(settings)
    index = await _index(settings, embedder.dimensions)
    stats = CacheStats(client)
    cache = AnswerCache(
        client,
        index,
        embedder,
        stats,
        CachePolicy(
            default_ttl_s=settings.default_ttl_s,
            max_ttl_s=settings.max_ttl_s,
            semantic_enabled=settings.semantic_enabled,
            min_similarity=settings.min_similarity,
            max_semantic_temperature=settings.max_semantic_temperature,
            max_semantic_chars=settings.max_semantic_chars,
            candidates=settings.semantic_candidates,
            semantic_timeout_s=settings.semantic_timeout_s,
            max_entries_per_tenant=settings.max_entries_per_tenant,
            max_bytes_per_tenant=settings.max_bytes_per_tenant,
            audit_min_similarity=settings.audit_min_similarity,
        ),
    )
    flusher = asyncio.create_task(stats.run())
    token = settings.admin_token.get_secret_value() if settings.admin_token else None
    servicer = CacheServicer(cache)
    admin = CacheAdminServicer(cache, token, client)

    def register(server: grpc.aio.Server) -> None:
        cache_pb2_grpc.add_CacheServiceServicer_to_server(servicer, server)
        cache_pb2_grpc.add_CacheAdminServiceServicer_to_server(admin, server)

    async def close() -> None:
        await cancel_and_wait(flusher)
        with contextlib.suppress(Exception):
            await stats.flush()
        await index.aclose()
        await embedder.aclose()
        await client.aclose()

    return Service(
        name="cache",
        register=register,
        service_names=[SERVICE_NAME, ADMIN_SERVICE_NAME],
        # A later Redis outage keeps the cache in rotation: lookups fail fast and count
        # as misses.
        probes={"redis": answered_once(cache.ping)},
        close=close,
    )
