"""Semantic reuse through the real CacheService: scopes, guards, expiry, invalidation, caps."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, timestamp_pb2
from pydantic import SecretStr

from services.cache.app import build as build_cache
from services.cache.settings import CacheSettings
from strata.cache.v1 import cache_pb2, cache_pb2_grpc
from strata.common.v1 import common_pb2
from tests.grpc.conftest import ADMIN_TOKEN, LOCAL, Served, serve, shutdown
from tests.helpers import rich_error, user

AUTH = (("authorization", f"Bearer {ADMIN_TOKEN}"),)
SEMANTIC, EXACT = common_pb2.CACHE_MATCH_SEMANTIC, common_pb2.CACHE_MATCH_EXACT
QUESTION = "How do I reset my password?"
PARAPHRASE = "How can I reset my password?"


def scope(tenant: str = "acme", model: str = "mock-fast", **kw: Any) -> cache_pb2.CacheScope:
    params = kw.pop("params", common_pb2.GenerationParams(temperature=0))
    return cache_pb2.CacheScope(tenant_id=tenant, model=model, params=params, **kw)


def answer(text: str = "Open settings, then Security.") -> cache_pb2.CachedAnswer:
    return cache_pb2.CachedAnswer(
        text=text,
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(input_tokens=7, output_tokens=5),
    )


async def store(stub: Any, where: cache_pb2.CacheScope, messages: list[Any], **kw: Any) -> str:
    reply = await stub.Store(
        cache_pb2.StoreRequest(scope=where, messages=messages, answer=answer(), **kw)
    )
    return str(reply.entry_id)


async def lookup(stub: Any, where: cache_pb2.CacheScope, messages: list[Any]) -> Any:
    return await stub.Lookup(cache_pb2.LookupRequest(scope=where, messages=messages))


def system(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=text)


def assistant(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, content=text)


@pytest.fixture(params=["edge", "qdrant"])
async def semantic_cache(
    request: pytest.FixtureRequest, redis_db: redis.Redis, redis_url: str, tmp_path: Path
) -> AsyncIterator[Served]:
    """The cache on each vector backend: the embedded engine and qdrant-client (local mode)."""
    settings = CacheSettings(
        redis_url=redis_url,
        data_dir=tmp_path / "cache",
        vector_backend=request.param,
        qdrant_url=":memory:" if request.param == "qdrant" else None,
        admin_token=SecretStr(ADMIN_TOKEN),
        max_entries_per_tenant=5,
        **LOCAL,
    )
    served = await serve(settings, await build_cache(settings), cache_pb2_grpc.CacheServiceStub)
    yield served
    await shutdown(served)


@pytest.fixture
def admin(semantic_cache: Served) -> Any:
    return cache_pb2_grpc.CacheAdminServiceStub(semantic_cache.channel)


async def test_a_paraphrase_is_served_by_meaning(semantic_cache: Served) -> None:
    stub = semantic_cache.stub
    entry = await store(stub, scope(), [user(QUESTION)])
    found = await lookup(stub, scope(), [user(PARAPHRASE)])
    assert found.match == SEMANTIC
    assert found.answer.text == "Open settings, then Security."
    assert 0.83 <= found.similarity <= 1
    assert found.entry_id == entry
    exact = await lookup(stub, scope(), [user("  How do I reset my  password? ")])
    assert exact.match == EXACT  # normalised whitespace is the same question


@pytest.mark.parametrize(
    ("stored", "other"),
    [
        (scope(), scope(tenant="globex")),
        (scope(), scope(model="mock-small")),
        (scope(), scope(params=common_pb2.GenerationParams(temperature=0.5))),
        (scope(), scope(params=common_pb2.GenerationParams(temperature=0, max_output_tokens=9))),
        (
            scope(documents=[cache_pb2.DocumentRef(id="faq", version="1")]),
            scope(documents=[cache_pb2.DocumentRef(id="faq", version="2")]),
        ),
    ],
    ids=["tenant", "model", "temperature", "max-tokens", "document-version"],
)
async def test_every_scope_field_alone_prevents_a_semantic_hit(
    semantic_cache: Served, stored: Any, other: Any
) -> None:
    await store(semantic_cache.stub, stored, [user(QUESTION)])
    assert (await lookup(semantic_cache.stub, stored, [user(PARAPHRASE)])).match == SEMANTIC
    assert (await lookup(semantic_cache.stub, other, [user(PARAPHRASE)])).match == 0


async def test_the_system_prompt_and_the_earlier_conversation_are_scope(
    semantic_cache: Served,
) -> None:
    stub = semantic_cache.stub
    gym = [user("I pay for a gym membership."), assistant("Noted."), user("Cancel it please")]
    stream = [user("I pay for a streaming plan."), assistant("Noted."), user("Cancel it please")]
    await store(stub, scope(), gym)
    assert (await lookup(stub, scope(), gym)).match == EXACT
    assert (await lookup(stub, scope(), stream)).match == 0
    await store(stub, scope(), [system("Answer in French."), user(QUESTION)])
    assert (await lookup(stub, scope(), [system("Answer in German."), user(PARAPHRASE)])).match == 0


async def test_a_close_trap_is_refused_by_a_guard_and_counted(
    semantic_cache: Served, admin: Any
) -> None:
    stub = semantic_cache.stub
    await store(stub, scope(), [user("Track order 48213")])
    found = await lookup(stub, scope(), [user("Track order 48231")])
    assert found.match == 0
    assert found.rejected_by == "numbers"
    stats = await admin.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme"), metadata=AUTH)
    assert stats.guard_rejections["numbers"] == 1
    assert (stats.stores, stats.misses) == (1, 1)


async def test_semantic_reuse_respects_the_temperature_bound_and_opt_out(
    semantic_cache: Served,
) -> None:
    stub = semantic_cache.stub
    hot = scope(params=common_pb2.GenerationParams(temperature=1.5))
    await store(stub, hot, [user(QUESTION)])
    assert (await lookup(stub, hot, [user(PARAPHRASE)])).match == 0
    allowed = scope(
        params=common_pb2.GenerationParams(temperature=1.5),
        semantic=cache_pb2.SemanticPolicy(allow_high_temperature=True),
    )
    assert (await lookup(stub, allowed, [user(PARAPHRASE)])).match == SEMANTIC
    await store(stub, scope(), [user(QUESTION)])
    opted_out = scope(semantic=cache_pb2.SemanticPolicy(disabled=True))
    assert (await lookup(stub, opted_out, [user(PARAPHRASE)])).match == 0
    assert (await lookup(stub, opted_out, [user(QUESTION)])).match == EXACT
    strict = scope(semantic=cache_pb2.SemanticPolicy(min_similarity=0.9999))
    assert (await lookup(stub, strict, [user(PARAPHRASE)])).match == 0


async def test_an_answer_stored_without_reuse_by_meaning_is_kept_for_exact_reuse_only(
    semantic_cache: Served,
) -> None:
    stub = semantic_cache.stub
    opted_out = scope(semantic=cache_pb2.SemanticPolicy(disabled=True))
    await store(stub, opted_out, [user(QUESTION)])  # no embedding on its way
    assert (await lookup(stub, scope(), [user(QUESTION)])).match == EXACT
    assert (await lookup(stub, scope(), [user(PARAPHRASE)])).match == 0


async def test_an_expired_entry_is_never_served(semantic_cache: Served) -> None:
    stub = semantic_cache.stub
    await store(stub, scope(), [user(QUESTION)], ttl=duration_pb2.Duration(seconds=1))
    assert (await lookup(stub, scope(), [user(PARAPHRASE)])).match == SEMANTIC
    await asyncio.sleep(1.2)
    assert (await lookup(stub, scope(), [user(PARAPHRASE)])).match == 0
    assert (await lookup(stub, scope(), [user(QUESTION)])).match == 0


async def test_invalidation_by_document_model_age_and_tenant(
    semantic_cache: Served, admin: Any, redis_db: redis.Redis
) -> None:
    stub = semantic_cache.stub
    faq = scope(documents=[cache_pb2.DocumentRef(id="faq", version="3")])
    await store(stub, faq, [user(QUESTION)])
    await store(stub, scope(model="mock-small"), [user("What are your opening hours?")])
    await store(stub, scope(), [user("Where is my parcel?")])

    async def invalidate(**kw: Any) -> int:
        reply = await admin.Invalidate(
            cache_pb2.InvalidateRequest(request_id=f"inv-{time.time_ns()}", tenant_id="acme", **kw),
            metadata=AUTH,
        )
        return int(reply.removed)

    assert await invalidate(document_id="faq") == 1
    assert (await lookup(stub, faq, [user(QUESTION)])).match == 0
    assert await invalidate(model="mock-small") == 1
    assert (await lookup(stub, scope(), [user("Where is my parcel?")])).match == EXACT
    past = timestamp_pb2.Timestamp()
    past.FromSeconds(int(time.time()) - 3600)
    assert await invalidate(older_than=past) == 0
    assert await invalidate(all=True) == 1
    assert (await lookup(stub, scope(), [user("Where is my parcel?")])).match == 0
    assert not list(redis_db.scan_iter("strata:cache:exact:acme:*"))


async def test_invalidate_needs_a_condition_and_the_admin_token(
    semantic_cache: Served, admin: Any
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.Invalidate(
            cache_pb2.InvalidateRequest(request_id="inv-1", tenant_id="acme"), metadata=AUTH
        )
    assert rich_error(caught.value).field_violations == ["all"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme"))
    assert rich_error(caught.value).reason == "ADMIN_TOKEN_INVALID"


async def test_a_tenant_over_its_cap_loses_its_oldest_entries(
    semantic_cache: Served, redis_db: redis.Redis
) -> None:
    stub = semantic_cache.stub
    questions = [f"Question number {n} about shipping" for n in range(7)]
    for question in questions:
        await store(stub, scope(), [user(question)])
    assert redis_db.zcard("strata:cache:entries:acme") == 5  # the cap of this fixture
    assert (await lookup(stub, scope(), [user(questions[0])])).match == 0
    assert (await lookup(stub, scope(), [user(questions[1])])).match == 0
    assert (await lookup(stub, scope(), [user(questions[6])])).match == EXACT
    await store(stub, scope(tenant="globex"), [user(questions[0])])
    assert (await lookup(stub, scope(tenant="globex"), [user(questions[0])])).match == EXACT


async def test_audit_compares_a_fresh_answer(semantic_cache: Served, admin: Any) -> None:
    stub = semantic_cache.stub
    entry = await store(stub, scope(), [user(QUESTION)])
    same = await stub.Audit(
        cache_pb2.AuditRequest(
            tenant_id="acme", entry_id=entry, answer_text="Open settings and then Security."
        )
    )
    other = await stub.Audit(
        cache_pb2.AuditRequest(
            tenant_id="acme", entry_id=entry, answer_text="Bananas are rich in potassium."
        )
    )
    assert same.agreed and not other.agreed
    assert same.similarity > other.similarity
    stats = await admin.GetStats(cache_pb2.GetStatsRequest(tenant_id="acme"), metadata=AUTH)
    assert (stats.audits, stats.audit_disagreements) == (2, 1)


async def test_a_batch_store_embeds_once_and_stores_every_entry(semantic_cache: Served) -> None:
    questions = [QUESTION, "What are your opening hours?", "Where is my parcel?"]
    reply = await semantic_cache.stub.StoreBatch(
        cache_pb2.StoreBatchRequest(
            entries=[
                cache_pb2.StoreRequest(scope=scope(), messages=[user(q)], answer=answer(q))
                for q in questions
            ]
        )
    )
    assert len(reply.entry_ids) == 3
    found = await lookup(semantic_cache.stub, scope(), [user(PARAPHRASE)])
    assert (found.match, found.answer.text) == (SEMANTIC, QUESTION)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await semantic_cache.stub.StoreBatch(cache_pb2.StoreBatchRequest())
    assert rich_error(caught.value).field_violations == ["entries"]
