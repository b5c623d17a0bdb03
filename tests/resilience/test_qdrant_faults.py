"""Qdrant failing or slow, for real: a port nothing listens on (a stopped server), then a TCP
listener that accepts connections and never answers (a hung server).

The semantic cache lookup gives up within `semantic_timeout_s` and counts a miss (exact reuse
keeps working); retrieval follows the request's or route's `on_failure` policy: FAIL is
UNAVAILABLE/RETRIEVAL_UNAVAILABLE, ANSWER_WITHOUT_CONTEXT answers without documents and says
so in the final chunk (`retrieval_degraded`). Both services start while Qdrant is away.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from pydantic import SecretStr

from services.cache.app import build as build_cache
from services.cache.settings import CacheSettings
from strata.cache.v1 import cache_pb2, cache_pb2_grpc
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2
from tests.conftest import ApiKeys
from tests.grpc import conftest as grpc_fixtures
from tests.grpc.conftest import ADMIN_TOKEN, LOCAL, Served, StartOrchestrator, serve, shutdown
from tests.helpers import bearer, rich_error, user

# The in-process services of tests/grpc (start_orchestrator needs the other three).
cache = grpc_fixtures.cache
control = grpc_fixtures.control
executor = grpc_fixtures.executor
start_orchestrator = grpc_fixtures.start_orchestrator

SEMANTIC_TIMEOUT_S = 0.2
RETRIEVAL_TIMEOUT_S = 0.3
SLACK_S = 1.0
"""What a bounded call may take beyond its bound on a loaded test machine."""
WITHOUT_CONTEXT = orchestrator_pb2.RETRIEVAL_FAILURE_POLICY_ANSWER_WITHOUT_CONTEXT


class DeadQdrant:
    """127.0.0.1:<port> with no server (connections refused) until `hang()`: from then on a
    listener whose kernel completes every handshake and that never reads or answers."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hang(self) -> None:
        self.sock.listen(512)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def dead_qdrant() -> Iterator[DeadQdrant]:
    qdrant = DeadQdrant()
    try:
        yield qdrant
    finally:
        qdrant.close()


@pytest.fixture
async def qdrant_cache(
    dead_qdrant: DeadQdrant, redis_db: redis.Redis, redis_url: str, tmp_path: Path
) -> AsyncIterator[Served]:
    settings = CacheSettings(
        redis_url=redis_url,
        data_dir=tmp_path / "cache",
        vector_backend="qdrant",
        qdrant_url=dead_qdrant.url,
        semantic_timeout_s=SEMANTIC_TIMEOUT_S,
        admin_token=SecretStr(ADMIN_TOKEN),
        **LOCAL,
    )
    served = await serve(settings, await build_cache(settings), cache_pb2_grpc.CacheServiceStub)
    yield served
    await shutdown(served)


def scope() -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(
        tenant_id="acme", model="mock-fast", params=common_pb2.GenerationParams(temperature=0)
    )


def stored_answer() -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(
        text="Open settings, then Security.",
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(input_tokens=7, output_tokens=5),
    )


async def timed(call: object) -> tuple[object, float]:
    began = time.monotonic()
    result = await call  # type: ignore[misc]
    return result, time.monotonic() - began


def semantic_failures(client: redis.Redis) -> int:
    return int(client.hget("strata:cache:stats:acme", "semantic_failures") or 0)


@pytest.mark.parametrize("fault", ["refused", "hung"])
async def test_a_semantic_lookup_gives_up_within_its_bound_and_counts_a_miss(
    fault: str, dead_qdrant: DeadQdrant, qdrant_cache: Served, redis_db: redis.Redis
) -> None:
    if fault == "hung":
        dead_qdrant.hang()
    stub = qdrant_cache.stub
    question = [user("How do I reset my password?")]
    _, took = await timed(
        stub.Store(cache_pb2.StoreRequest(scope=scope(), messages=question, answer=stored_answer()))
    )
    assert took < SEMANTIC_TIMEOUT_S + SLACK_S  # the vector write gave up; exact reuse kept
    exact, _ = await timed(stub.Lookup(cache_pb2.LookupRequest(scope=scope(), messages=question)))
    assert exact.match == common_pb2.CACHE_MATCH_EXACT  # type: ignore[attr-defined]

    paraphrase = [user("How can I reset my password?")]
    for _ in range(3):
        missed, took = await timed(
            stub.Lookup(cache_pb2.LookupRequest(scope=scope(), messages=paraphrase))
        )
        assert missed.match == common_pb2.CACHE_MATCH_UNSPECIFIED  # type: ignore[attr-defined]
        assert took < SEMANTIC_TIMEOUT_S + SLACK_S
    # Counted (the counters reach Redis within a second): the store and three lookups.
    deadline = time.monotonic() + 5
    while semantic_failures(redis_db) < 4:
        assert time.monotonic() < deadline, semantic_failures(redis_db)
        await asyncio.sleep(0.1)  # the server runs on this loop
    assert int(redis_db.hget("strata:cache:stats:acme", "misses") or 0) >= 3


@pytest.fixture
async def orchestrator_on_dead_qdrant(
    start_orchestrator: StartOrchestrator, dead_qdrant: DeadQdrant, tmp_path: Path
) -> Served:
    routes = {
        "routes": {
            "kb-strict": {
                "candidates": ["mock-fast"],
                "retrieval": {"collection": "handbook"},
            },
            "kb-lenient": {
                "candidates": ["mock-fast"],
                "retrieval": {"collection": "handbook", "on_failure": "answer_without_context"},
            },
        }
    }
    path = tmp_path / "routes.yaml"
    path.write_text(yaml.safe_dump(routes))
    return await start_orchestrator(
        vector_backend="qdrant",
        qdrant_url=dead_qdrant.url,
        retrieval_timeout_s=RETRIEVAL_TIMEOUT_S,
        routes_file=path,
    )


def ask(**fields: Any) -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        messages=[user("What does the handbook say about holidays?")], **fields
    )


@pytest.mark.parametrize("fault", ["refused", "hung"])
async def test_retrieval_follows_the_failure_policy(
    fault: str,
    dead_qdrant: DeadQdrant,
    orchestrator_on_dead_qdrant: Served,
    test_keys: ApiKeys,
) -> None:
    if fault == "hung":
        dead_qdrant.hang()
    stub, key = orchestrator_on_dead_qdrant.stub, bearer(test_keys.acme)

    # FAIL (the default, by request or by route): a retryable UNAVAILABLE, within the bound.
    for request in (
        ask(model="mock-fast", retrieval=orchestrator_pb2.RetrievalSettings(collection="handbook")),
        ask(route="kb-strict"),
    ):
        began = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.Generate(request, metadata=key, timeout=30)
        assert time.monotonic() - began < RETRIEVAL_TIMEOUT_S + SLACK_S
        error = rich_error(failed.value)
        assert error.code == grpc.StatusCode.UNAVAILABLE
        assert error.reason == "RETRIEVAL_UNAVAILABLE"
        assert dead_qdrant.url not in error.message

    # ANSWER_WITHOUT_CONTEXT, by request (unary and streamed) and by route.
    lenient = orchestrator_pb2.RetrievalSettings(collection="handbook", on_failure=WITHOUT_CONTEXT)
    for request in (ask(model="mock-fast", retrieval=lenient), ask(route="kb-lenient")):
        began = time.monotonic()
        reply = await stub.Generate(request, metadata=key, timeout=30)
        assert time.monotonic() - began < RETRIEVAL_TIMEOUT_S + SLACK_S
        assert reply.text and reply.finish_reason == common_pb2.FINISH_REASON_STOP
        assert reply.retrieval_degraded
        assert not reply.citations
        # Not kept in the cache: the next identical request is answered fresh.
        again = await stub.Generate(request, metadata=key, timeout=30)
        assert again.cache_status == common_pb2.CACHE_STATUS_MISS
        assert again.retrieval_degraded

    streamed = orchestrator_pb2.StreamGenerateRequest(
        model="mock-fast", messages=ask().messages, retrieval=lenient
    )
    chunks = [c async for c in stub.StreamGenerate(streamed, metadata=key, timeout=30)]
    assert chunks[-1].HasField("final")
    assert chunks[-1].final.retrieval_degraded
    assert chunks[-1].final.finish_reason == common_pb2.FINISH_REASON_STOP
    assert not chunks[-1].final.citations


async def test_a_healthy_answer_is_not_marked_degraded(
    orchestrator_on_dead_qdrant: Served, test_keys: ApiKeys
) -> None:
    reply = await orchestrator_on_dead_qdrant.stub.Generate(
        ask(model="mock-fast"), metadata=bearer(test_keys.acme), timeout=30
    )
    assert not reply.retrieval_degraded
