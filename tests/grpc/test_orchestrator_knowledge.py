"""KnowledgeService and retrieval (RAG) through real stubs: ingest, cite, update, page, filter."""

from __future__ import annotations

import time
import uuid
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, timestamp_pb2

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import knowledge_pb2, knowledge_pb2_grpc, orchestrator_pb2
from tests.conftest import ApiKeys
from tests.grpc.conftest import Served
from tests.helpers import bearer, eventually, rich_error, state_snapshot, user

MISS, HIT = common_pb2.CACHE_STATUS_MISS, common_pb2.CACHE_STATUS_HIT
REFUNDS = (
    "Refunds are paid back to the original card within five business days of our receiving"
    " the returned item."
)
REFUNDS_V2 = (
    "Refunds now reach the original card within two business days; store credit is instant."
)
SHIPPING = "Orders ship from the Berlin warehouse and standard delivery takes three to five days."
PASSWORD = "To reset your password open Settings, choose Security and follow the link we email you."
QUESTION = "How long does a refund take to reach my card?"


def knowledge(served: Served) -> Any:
    return knowledge_pb2_grpc.KnowledgeServiceStub(served.channel)


def doc(document_id: str, text: str, version: str = "1", **metadata: str) -> knowledge_pb2.Document:
    return knowledge_pb2.Document(id=document_id, version=version, text=text, metadata=metadata)


async def upsert(
    served: Served, key: str, collection: str, *documents: knowledge_pb2.Document
) -> list[knowledge_pb2.UpsertDocumentsResponse]:
    request = knowledge_pb2.UpsertDocumentsRequest(
        request_id=uuid.uuid4().hex, collection=collection, documents=documents
    )
    return [
        m
        async for m in knowledge(served).UpsertDocuments(request, metadata=bearer(key), timeout=30)
    ]


async def search(served: Served, key: str, collection: str, query: str, **kw: Any) -> list[Any]:
    reply = await knowledge(served).Search(
        knowledge_pb2.SearchRequest(collection=collection, query=query, **kw),
        metadata=bearer(key),
    )
    return list(reply.hits)


async def ask(
    served: Served, key: str, question: str = QUESTION, **retrieval: Any
) -> orchestrator_pb2.GenerateResponse:
    reply: orchestrator_pb2.GenerateResponse = await served.stub.Generate(
        orchestrator_pb2.GenerateRequest(
            model="mock-fast",
            messages=[user(question)],
            params=common_pb2.GenerationParams(temperature=0),
            retrieval=orchestrator_pb2.RetrievalSettings(**retrieval),
        ),
        metadata=bearer(key),
        timeout=10,
    )
    return reply


def cached_answers(redis_db: redis.Redis, tenant: str = "acme") -> int:
    return sum(1 for _ in redis_db.scan_iter(f"strata:cache:exact:{tenant}:*"))


async def test_an_answer_cites_its_documents_and_an_update_is_never_served_stale(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    await upsert(
        orchestrator,
        test_keys.acme,
        "faq",
        doc("refunds", REFUNDS),
        doc("shipping", SHIPPING),
        doc("password", PASSWORD),
    )
    plain = await orchestrator.stub.Generate(
        orchestrator_pb2.GenerateRequest(model="mock-fast", messages=[user(QUESTION)]),
        metadata=bearer(test_keys.acme),
    )
    first = await ask(orchestrator, test_keys.acme, collection="faq", top_k=2, min_score=0.2)
    assert first.cache_status == MISS
    top = first.citations[0]
    assert (top.document_id, top.version, top.chunk) == ("refunds", "1", 0)
    assert 0.2 <= top.score <= 1.0
    scores = [c.score for c in first.citations]
    assert len(scores) <= 2 and scores == sorted(scores, reverse=True)
    assert all(s >= 0.2 for s in scores)
    # The chunks reached the model: the same question costs more prompt tokens with them.
    assert first.usage.input_tokens > plain.usage.input_tokens

    again = await ask(orchestrator, test_keys.acme, collection="faq", top_k=2, min_score=0.2)
    assert again.cache_status == HIT and list(again.citations) == list(first.citations)
    assert await eventually(lambda: cached_answers(redis_db) == 2)

    progress = await upsert(orchestrator, test_keys.acme, "faq", doc("refunds", REFUNDS_V2, "2"))
    assert (progress[-1].done, progress[-1].total) == (1, 1)
    # The answers grounded on `refunds` are gone; the one without retrieval stays.
    assert cached_answers(redis_db) == 1
    updated = await ask(orchestrator, test_keys.acme, collection="faq", top_k=2, min_score=0.2)
    assert updated.cache_status == MISS
    assert (updated.citations[0].document_id, updated.citations[0].version) == ("refunds", "2")
    assert all(c.version == "1" for c in updated.citations if c.document_id != "refunds")


async def test_deleting_a_document_drops_its_chunks_and_its_cached_answers(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    await upsert(orchestrator, test_keys.acme, "faq", doc("refunds", REFUNDS), doc("pw", PASSWORD))
    first = await ask(orchestrator, test_keys.acme, collection="faq", top_k=1)
    assert first.citations[0].document_id == "refunds"
    assert await eventually(lambda: cached_answers(redis_db)) == 1  # stored after the reply

    reply = await knowledge(orchestrator).DeleteDocuments(
        knowledge_pb2.DeleteDocumentsRequest(
            request_id="del-1", collection="faq", document_ids=["refunds", "never-stored"]
        ),
        metadata=bearer(test_keys.acme),
    )
    assert reply.deleted == 1
    assert cached_answers(redis_db) == 0
    hits = await search(orchestrator, test_keys.acme, "faq", QUESTION, top_k=10)
    assert {h.document_id for h in hits} == {"pw"}
    after = await ask(orchestrator, test_keys.acme, collection="faq", top_k=1)
    assert after.cache_status == MISS
    assert [c.document_id for c in after.citations] == ["pw"]


async def test_a_large_ingest_streams_progress_and_lists_in_pages(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    documents = [doc(f"doc-{i:02d}", f"Note {i}: {SHIPPING}", tier=str(i % 2)) for i in range(40)]
    progress = await upsert(orchestrator, test_keys.acme, "notes", *documents)
    done = [m.done for m in progress]
    assert len(progress) >= 2 and done == sorted(set(done))
    assert {m.total for m in progress} == {40}
    assert (progress[-1].done, progress[-1].chunks) == (40, 40)
    assert [m.chunks for m in progress] == sorted(m.chunks for m in progress)

    pages: list[list[knowledge_pb2.DocumentInfo]] = []
    token = ""
    while True:
        page = await knowledge(orchestrator).ListDocuments(
            knowledge_pb2.ListDocumentsRequest(collection="notes", page_size=15, page_token=token),
            metadata=bearer(test_keys.acme),
        )
        pages.append(list(page.documents))
        token = page.next_page_token
        if not token:
            break
    assert [len(p) for p in pages] == [15, 15, 10]
    listed = [d for p in pages for d in p]
    assert [d.id for d in listed] == [d.id for d in documents]
    first = listed[1]
    assert (first.version, first.chunks, dict(first.metadata)) == ("1", 1, {"tier": "1"})
    assert abs(first.update_time.ToSeconds() - time.time()) < 60


async def test_search_filters_by_labels_age_and_score(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    old = timestamp_pb2.Timestamp(seconds=int(time.time()) - 2 * 86_400)
    stale = doc("refunds-2019", REFUNDS, lang="en")
    stale.update_time.CopyFrom(old)
    await upsert(
        orchestrator,
        test_keys.acme,
        "faq",
        doc("refunds", REFUNDS, lang="en", area="billing"),
        doc("erstattung", REFUNDS, lang="de", area="billing"),
        doc("password", PASSWORD, lang="en", area="account"),
        stale,
    )
    everything = await search(orchestrator, test_keys.acme, "faq", QUESTION, top_k=10)
    assert len(everything) == 4
    hit = next(h for h in everything if h.document_id == "refunds")
    assert (hit.version, hit.chunk, hit.text) == ("1", 0, REFUNDS)
    assert dict(hit.metadata) == {"lang": "en", "area": "billing"}

    german = await search(
        orchestrator, test_keys.acme, "faq", QUESTION, top_k=10, metadata_filter={"lang": "de"}
    )
    assert [h.document_id for h in german] == ["erstattung"]
    both_labels = await search(
        orchestrator,
        test_keys.acme,
        "faq",
        QUESTION,
        top_k=10,
        metadata_filter={"lang": "en", "area": "billing"},
    )
    assert {h.document_id for h in both_labels} == {"refunds"}

    recent = await search(
        orchestrator,
        test_keys.acme,
        "faq",
        QUESTION,
        top_k=10,
        max_age=duration_pb2.Duration(seconds=86_400),
    )
    assert {h.document_id for h in recent} == {"refunds", "erstattung", "password"}
    # Under a second is still an age limit, not "no limit".
    blink = await search(
        orchestrator,
        test_keys.acme,
        "faq",
        QUESTION,
        top_k=10,
        max_age=duration_pb2.Duration(nanos=500_000_000),
    )
    assert "refunds-2019" not in {h.document_id for h in blink}

    threshold = (everything[0].score + everything[-1].score) / 2
    strong = await search(
        orchestrator, test_keys.acme, "faq", QUESTION, top_k=10, min_score=threshold
    )
    assert strong and len(strong) < 4 and all(h.score >= threshold for h in strong)
    assert len(await search(orchestrator, test_keys.acme, "faq", QUESTION, top_k=2)) == 2

    # The same filters apply to a generate request's retrieval.
    answer = await ask(
        orchestrator, test_keys.acme, collection="faq", top_k=5, metadata_filter={"lang": "de"}
    )
    assert [c.document_id for c in answer.citations] == ["erstattung"]


@pytest.mark.parametrize(
    ("request_", "fields"),
    [
        (
            knowledge_pb2.UpsertDocumentsRequest(
                request_id="bad-1", collection="", documents=[doc("a", "text")]
            ),
            ["collection"],
        ),
        (
            knowledge_pb2.UpsertDocumentsRequest(
                request_id="bad-2", collection="faq", documents=[doc("", "text")]
            ),
            ["documents[0].id"],
        ),
        (
            knowledge_pb2.UpsertDocumentsRequest(
                request_id="bad-3",
                collection="Not A Name",
                documents=[doc("a", "text"), doc("a", " ", version="")],
            ),
            ["collection", "documents[1].id", "documents[1].version", "documents[1].text"],
        ),
    ],
    ids=["empty-collection", "no-document-id", "several"],
)
async def test_a_bad_upsert_is_refused_whole_with_its_field_violations(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    request_: knowledge_pb2.UpsertDocumentsRequest,
    fields: list[str],
) -> None:
    await upsert(orchestrator, test_keys.acme, "faq", doc("kept", PASSWORD))
    before = state_snapshot(redis_db)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in knowledge(orchestrator).UpsertDocuments(
            request_, metadata=bearer(test_keys.acme)
        ):
            pass
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == fields
    assert state_snapshot(redis_db) == before


async def test_bad_searches_and_retrievals_are_invalid_arguments(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await search(orchestrator, test_keys.acme, "", "anything", top_k=99)
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field_violations == ["collection", "top_k"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await ask(orchestrator, test_keys.acme, collection="", min_score=2.0)
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.field_violations == ["retrieval.collection", "retrieval.min_score"]


async def test_another_tenant_sees_nothing_of_a_collection_and_changes_nothing(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    await upsert(orchestrator, test_keys.acme, "faq", doc("refunds", REFUNDS), doc("pw", PASSWORD))

    # Collections are per tenant: globex's "faq" is another, empty collection, so nothing is
    # NOT_FOUND; it is simply empty.
    assert await search(orchestrator, test_keys.globex, "faq", QUESTION, top_k=10) == []
    listed = await knowledge(orchestrator).ListDocuments(
        knowledge_pb2.ListDocumentsRequest(collection="faq"), metadata=bearer(test_keys.globex)
    )
    assert list(listed.documents) == [] and listed.next_page_token == ""
    deleted = await knowledge(orchestrator).DeleteDocuments(
        knowledge_pb2.DeleteDocumentsRequest(
            request_id="globex-del", collection="faq", document_ids=["refunds", "pw"]
        ),
        metadata=bearer(test_keys.globex),
    )
    assert deleted.deleted == 0
    answer = await ask(orchestrator, test_keys.globex, collection="faq")
    assert list(answer.citations) == []

    # globex writing the same ids leaves acme's documents as they were.
    await upsert(orchestrator, test_keys.globex, "faq", doc("refunds", SHIPPING, "9"))
    mine = await search(orchestrator, test_keys.acme, "faq", QUESTION, top_k=10)
    assert {(h.document_id, h.version, h.text) for h in mine} == {
        ("refunds", "1", REFUNDS),
        ("pw", "1", PASSWORD),
    }
    theirs = await search(orchestrator, test_keys.globex, "faq", QUESTION, top_k=10)
    assert [(h.document_id, h.version) for h in theirs] == [("refunds", "9")]
    # Another key of acme shares acme's collections.
    assert len(await search(orchestrator, test_keys.acme_second, "faq", QUESTION)) == 2


async def test_knowledge_calls_need_a_valid_key(orchestrator: Served, test_keys: ApiKeys) -> None:
    for metadata in ((), bearer(test_keys.disabled)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await knowledge(orchestrator).Search(
                knowledge_pb2.SearchRequest(collection="faq", query="refund"), metadata=metadata
            )
        assert rich_error(caught.value).code == grpc.StatusCode.UNAUTHENTICATED
