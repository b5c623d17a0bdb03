"""The cache embeds each question once: a lookup that gives up on its semantic step (its
timeout) leaves the vector to the store that follows, and lookups of one question at the
same time share one embedding. Real Redis, Qdrant's engine in-process, the real embedder
behind a gate that holds its inference."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from services.cache import answers as answers_module
from services.cache.answers import AnswerCache, CachePolicy
from services.cache.stats import CacheStats
from services.cache.vectors import EdgeIndex, Entry
from services.common.embeddings import LocalEmbedder
from services.common.redis_state import connect, run_pipeline
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2
from tests.helpers import user

SEMANTIC_TIMEOUT_S = 0.1


class GatedEmbedder:
    """The real embedder; each call is counted and waits for `open`."""

    def __init__(self, inner: LocalEmbedder) -> None:
        self.inner = inner
        self.dimensions = inner.dimensions
        self.open = asyncio.Event()
        self.texts: list[str] = []

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        self.texts += texts
        await self.open.wait()
        return await self.inner.embed(texts)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
async def gated() -> AsyncIterator[GatedEmbedder]:
    embedder = GatedEmbedder(await asyncio.to_thread(LocalEmbedder))
    yield embedder
    await embedder.aclose()


@pytest.fixture
async def answers(
    gated: GatedEmbedder, redis_db: redis.Redis, redis_url: str, tmp_path: Path
) -> AsyncIterator[AnswerCache]:
    client = connect(redis_url, timeout_s=2.0)
    index = EdgeIndex(tmp_path / "vectors", gated.dimensions)
    policy = CachePolicy(
        default_ttl_s=3600,
        max_ttl_s=86400,
        semantic_enabled=True,
        min_similarity=0.83,
        max_semantic_temperature=1.0,
        candidates=4,
        semantic_timeout_s=SEMANTIC_TIMEOUT_S,
        max_entries_per_tenant=1000,
        max_bytes_per_tenant=10_000_000,
        audit_min_similarity=0.5,
    )
    yield AnswerCache(client, index, gated, CacheStats(client), policy)
    await index.aclose()
    await client.aclose()


def scope() -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(
        tenant_id="acme", model="mock-fast", params=common_pb2.GenerationParams(temperature=0)
    )


def lookup(question: str) -> cache_pb2.LookupRequest:
    return cache_pb2.LookupRequest(scope=scope(), messages=[user(question)])


def store(question: str) -> cache_pb2.StoreRequest:
    return cache_pb2.StoreRequest(
        scope=scope(),
        messages=[user(question)],
        answer=cache_pb2.CachedAnswer(
            text="Open settings, then Security.",
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(input_tokens=7, output_tokens=5),
        ),
    )


async def test_a_lookup_that_gave_up_leaves_its_vector_to_the_store(
    answers: AnswerCache, gated: GatedEmbedder
) -> None:
    question = "How do I reset my password?"
    missed = await answers.lookup(lookup(question))  # the embedding is held: it gives up
    assert missed.match == common_pb2.CACHE_MATCH_UNSPECIFIED
    gated.open.set()
    await answers.store(store(question))  # the answer the model gave meanwhile
    assert len(gated.texts) == 1  # embedded once, for both

    paraphrase = await answers.lookup(lookup("How can I reset my password?"))
    assert paraphrase.match == common_pb2.CACHE_MATCH_SEMANTIC
    assert len(gated.texts) == 2


async def test_lookups_of_one_question_at_once_share_its_embedding(
    answers: AnswerCache, gated: GatedEmbedder
) -> None:
    question = "Where is my parcel?"
    calls = [asyncio.create_task(answers.lookup(lookup(question))) for _ in range(5)]
    await asyncio.sleep(SEMANTIC_TIMEOUT_S / 4)
    gated.open.set()
    for found in await asyncio.gather(*calls):
        assert found.match == common_pb2.CACHE_MATCH_UNSPECIFIED  # (nothing stored yet)
    assert len(gated.texts) == 1


async def test_a_batch_embeds_only_the_answers_kept_for_reuse_by_meaning(
    answers: AnswerCache, gated: GatedEmbedder
) -> None:
    gated.open.set()
    exact_only = store("What are your opening hours?")
    exact_only.scope.semantic.disabled = True
    entries = [store("How do I reset my password?"), exact_only]
    stored = await answers.store_batch(entries)
    assert gated.texts == ["How do I reset my password?"]  # the opted-out one is not embedded
    assert len(set(stored)) == 2
    for entry in entries:
        found = await answers.lookup(
            cache_pb2.LookupRequest(scope=entry.scope, messages=entry.messages)
        )
        assert found.match == common_pb2.CACHE_MATCH_EXACT


async def test_a_batch_goes_to_redis_in_one_round_trip_and_to_the_index_in_one_upsert(
    answers: AnswerCache, gated: GatedEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    gated.open.set()
    pipelines: list[int] = []
    upserts: list[list[str]] = []
    upsert = EdgeIndex.upsert

    async def counted(client: Any, build: Callable[[Any], None], scripts: Any) -> list[Any]:
        pipelines.append(1)
        return await run_pipeline(client, build, scripts)

    async def seen(self: EdgeIndex, entries: Sequence[Entry]) -> None:
        upserts.append([entry.query for entry in entries])
        await upsert(self, entries)

    monkeypatch.setattr(answers_module, "run_pipeline", counted)
    monkeypatch.setattr(EdgeIndex, "upsert", seen)
    globex = store("Where is my parcel?")
    globex.scope.tenant_id = "globex"
    entries = [store("How do I reset my password?"), globex, store("How do I reset my password?")]

    stored = await answers.store_batch(entries)

    assert stored[0] == stored[2] != stored[1]
    assert len(pipelines) == 1
    # The answer stored twice is one point.
    assert upserts == [["How do I reset my password?", "Where is my parcel?"]]
    for entry in entries:
        found = await answers.lookup(
            cache_pb2.LookupRequest(scope=entry.scope, messages=entry.messages)
        )
        assert found.match == common_pb2.CACHE_MATCH_EXACT
    paraphrase = await answers.lookup(lookup("How can I reset my password?"))
    assert paraphrase.match == common_pb2.CACHE_MATCH_SEMANTIC
    elsewhere = lookup("Where is my parcel?")  # acme's scope: globex's answer is not acme's
    assert (await answers.lookup(elsewhere)).match == common_pb2.CACHE_MATCH_UNSPECIFIED


async def test_a_question_longer_than_max_semantic_chars_is_reused_exactly_only(
    answers: AnswerCache, gated: GatedEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long question (2,400 characters: the embedder sees its first few hundred words
    only) is neither embedded nor indexed nor looked up by meaning, so no guard compares
    it: asked again exactly it is a hit, changed at its end a miss. A short one is still
    reused by meaning."""
    gated.open.set()
    compared: list[tuple[str, str]] = []
    check = answers_module.guards.check

    def counted(a: str, b: str) -> Any:
        compared.append((a, b))
        return check(a, b)

    monkeypatch.setattr(answers_module.guards, "check", counted)
    body = " ".join(
        f"Clause {n} of the supply contract sets the delivery terms." for n in range(40)
    )
    long_question = f"Summarise this contract for a buyer: {body} Answer in English."
    assert 2000 < len(long_question) < 3000

    await answers.store(store(long_question))
    exact = await answers.lookup(lookup(long_question))
    changed = await answers.lookup(lookup(long_question.replace("English.", "French.")))

    assert exact.match == common_pb2.CACHE_MATCH_EXACT
    assert changed.match == common_pb2.CACHE_MATCH_UNSPECIFIED
    assert gated.texts == [] and compared == []
    await answers.store(store("How do I reset my password?"))
    paraphrase = await answers.lookup(lookup("How can I reset my password?"))
    assert paraphrase.match == common_pb2.CACHE_MATCH_SEMANTIC
    assert len(compared) == 1
