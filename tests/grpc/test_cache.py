"""The cache service through real stubs, against a real Redis."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2

from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2
from tests.grpc.conftest import Served
from tests.helpers import rich_error, user


def scope(tenant: str = "acme", model: str = "mock-small", **params: Any) -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(
        tenant_id=tenant, model=model, params=common_pb2.GenerationParams(**params)
    )


ANSWER = cache_pb2.CachedAnswer(
    text="Paris.",
    finish_reason=common_pb2.FINISH_REASON_STOP,
    usage=common_pb2.Usage(input_tokens=9, output_tokens=2),
    request_id="req-1",
)
QUESTION = [user("What is the capital of France?")]


async def store(cache: Served, where: cache_pb2.CacheScope, **kw: Any) -> str:
    reply = await cache.stub.Store(
        cache_pb2.StoreRequest(scope=where, messages=QUESTION, answer=ANSWER, **kw)
    )
    return str(reply.entry_id)


async def lookup(cache: Served, where: cache_pb2.CacheScope, messages=QUESTION):
    return await cache.stub.Lookup(cache_pb2.LookupRequest(scope=where, messages=messages))


async def test_a_stored_answer_is_found_exactly(cache: Served) -> None:
    await store(cache, scope(temperature=0.0))
    found = await lookup(cache, scope(temperature=0.0))
    assert found.match == common_pb2.CACHE_MATCH_EXACT
    assert found.answer.text == "Paris."
    assert found.answer.usage.output_tokens == 2
    assert found.answer.request_id == "req-1"
    assert found.answer.create_time.seconds > 0


@pytest.mark.parametrize(
    "other",
    [
        scope(tenant="globex", temperature=0.0),
        scope(model="mock-fast", temperature=0.0),
        scope(temperature=0.7),
        scope(),
        scope(temperature=0.0, max_output_tokens=5),
        scope(temperature=0.0, stop=["."]),
    ],
    ids=["tenant", "model", "temperature", "unset-temperature", "max-tokens", "stop"],
)
async def test_nothing_crosses_scopes(cache: Served, other: cache_pb2.CacheScope) -> None:
    await store(cache, scope(temperature=0.0))
    assert (await lookup(cache, other)).match == common_pb2.CACHE_MATCH_UNSPECIFIED


async def test_another_conversation_misses(cache: Served) -> None:
    await store(cache, scope())
    system = common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Answer in French.")
    for messages in ([user("What is the capital of Spain?")], [system, *QUESTION]):
        assert (await lookup(cache, scope(), messages)).match == common_pb2.CACHE_MATCH_UNSPECIFIED


async def test_entries_expire_as_asked_and_within_the_cap(
    cache: Served, redis_db: redis.Redis
) -> None:
    entry = await store(cache, scope(), ttl=duration_pb2.Duration(seconds=30))
    key = f"strata:cache:exact:acme:{entry}"
    assert 0 < redis_db.ttl(key) <= 30
    await store(cache, scope(), ttl=duration_pb2.Duration(seconds=10**9))
    assert 3600 < redis_db.ttl(key) <= 7 * 24 * 3600
    await store(cache, scope())
    assert 0 < redis_db.ttl(key) <= 3600


async def test_a_store_keeps_the_byte_total_in_one_round_trip_and_survives_a_script_flush(
    cache: Served, redis_db: redis.Redis
) -> None:
    """The store is one script: it keeps the tenant's size total (replacing an entry counts
    its new size only) and is loaded again when Redis lost it."""
    redis_db.script_flush()
    entry = await store(cache, scope(tenant="sizes"))
    sizes = "strata:cache:sizes:sizes"
    one = int(redis_db.hget(sizes, entry) or 0)
    assert one > 0 and int(redis_db.hget(sizes, "total") or 0) == one
    await store(cache, scope(tenant="sizes"))  # the same entry again
    assert int(redis_db.hget(sizes, "total") or 0) == one
    assert redis_db.zcard("strata:cache:entries:sizes") == 1
    found = await lookup(cache, scope(tenant="sizes"))
    assert found.match == common_pb2.CACHE_MATCH_EXACT


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (cache_pb2.LookupRequest(scope=scope(tenant=""), messages=QUESTION), "scope.tenant_id"),
        (cache_pb2.LookupRequest(scope=scope(model=""), messages=QUESTION), "scope.model"),
        (cache_pb2.LookupRequest(scope=scope()), "messages"),
    ],
)
async def test_lookup_without_scope_is_invalid(
    cache: Served, request_: cache_pb2.LookupRequest, field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await cache.stub.Lookup(request_)
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == [field]


async def test_store_refuses_a_negative_ttl(cache: Served, redis_db: redis.Redis) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await store(cache, scope(), ttl=duration_pb2.Duration(seconds=-5))
    assert rich_error(caught.value).field_violations == ["ttl"]
    assert redis_db.dbsize() == 0
