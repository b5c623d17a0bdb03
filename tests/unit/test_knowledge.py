"""The knowledge store on real engines: chunking, upserts, search, replace, delete, list.

Everything that touches the vector index runs on both backends (qdrant-edge on disk and
qdrant-client's local mode), with the real local embedder and a real Redis registry.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from google.protobuf import timestamp_pb2

from services.common.embeddings import DIMENSIONS, LocalEmbedder
from services.common.errors import RequestInvalid
from services.executor.tokens import count
from services.orchestrator.knowledge import (
    EMBED_BATCH,
    Chunk,
    ChunkPoint,
    DocumentIndex,
    EdgeDocumentIndex,
    KnowledgeStore,
    QdrantDocumentIndex,
    chunk_text,
)
from strata.orchestrator.v1 import knowledge_pb2

TOPICS = {
    "volcano": (
        "Volcanoes form where magma from deep inside the Earth rises through cracks in the "
        "crust. During an eruption, lava flows down the slopes of the mountain while clouds "
        "of ash and volcanic gas are thrown high into the sky."
    ),
    "sourdough": (
        "To bake sourdough bread, feed the starter the day before, mix flour, water and salt, "
        "fold the dough a few times, let it rise slowly overnight in a cool place, and bake "
        "it in a very hot Dutch oven until the crust is dark brown."
    ),
    "chess": (
        "In chess the knight moves in an L shape: two squares in one direction and then one "
        "square to the side. It is the only piece that can jump over other pieces, which "
        "makes it strong in closed positions."
    ),
    "tax": (
        "Companies must file their value added tax return every quarter. The return lists "
        "the VAT charged on sales and the VAT paid on purchases; the difference is owed to "
        "the tax office or refunded by it."
    ),
}
QUERIES = {
    "volcano": "why does lava come out of a mountain",
    "sourdough": "how do I make my bread dough rise",
    "chess": "which chess piece can jump over the others",
    "tax": "when do businesses have to declare VAT",
}
DAY = 86_400.0


def document(
    document_id: str,
    text: str,
    version: str = "v1",
    metadata: Mapping[str, str] | None = None,
    update_time: float | None = None,
) -> knowledge_pb2.Document:
    made = knowledge_pb2.Document(
        id=document_id, version=version, text=text, metadata=dict(metadata or {})
    )
    if update_time is not None:
        stamp = timestamp_pb2.Timestamp()
        stamp.FromNanoseconds(int(update_time * 1e9))
        made.update_time.CopyFrom(stamp)
    return made


def topic_documents(**metadata: dict[str, str]) -> list[knowledge_pb2.Document]:
    return [document(name, text, metadata=metadata.get(name)) for name, text in TOPICS.items()]


async def upsert_all(
    store: KnowledgeStore,
    tenant: str,
    collection: str,
    documents: Sequence[knowledge_pb2.Document],
) -> list[tuple[int, int, int]]:
    return [event async for event in store.upsert(tenant, collection, documents)]


def numbered_words(n: int) -> str:
    """n distinct words, so a chunk's place in the text can be read off its words."""
    return " ".join(f"w{i}" for i in range(n))


def violations(err: pytest.ExceptionInfo[RequestInvalid]) -> list[str]:
    return [v.field for v in err.value.violations]


@pytest.fixture(scope="module")
def embedder() -> Iterator[LocalEmbedder]:
    """One embedder for the module: loading the model is the slow part."""
    local = LocalEmbedder(threads=2)
    yield local
    asyncio.run(local.aclose())


async def open_index(backend: str, tmp_path: Path) -> EdgeDocumentIndex | QdrantDocumentIndex:
    if backend == "edge":
        return EdgeDocumentIndex(tmp_path / "knowledge", DIMENSIONS)
    index = QdrantDocumentIndex(DIMENSIONS, location=":memory:")
    await index.start()
    return index


@pytest.fixture(params=["edge", "qdrant"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[DocumentIndex]:
    opened = await open_index(request.param, tmp_path)
    yield opened
    await opened.aclose()


@pytest.fixture
async def client(redis_db: redis.Redis, redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """An asyncio client of the test Redis, emptied (by redis_db) before the test."""
    opened = aioredis.Redis.from_url(redis_url)
    yield opened
    await opened.aclose()


@pytest.fixture
def store(index: DocumentIndex, embedder: LocalEmbedder, client: aioredis.Redis) -> KnowledgeStore:
    return KnowledgeStore(index, embedder, client)


# Chunking


def test_chunks_fit_the_budget_and_cover_the_text_in_order() -> None:
    text = numbered_words(3000)

    chunks = chunk_text(text, chunk_tokens=200, overlap_tokens=40)

    sizes = [count(chunk) for chunk in chunks]
    assert max(sizes) <= 200
    # Boundaries move by at most a quarter window to find whitespace.
    assert min(sizes[:-1]) >= 150
    words = [word for chunk in chunks for word in chunk.split()]
    assert list(dict.fromkeys(words)) == text.split()


def test_consecutive_chunks_overlap_by_about_the_overlap() -> None:
    chunks = chunk_text(numbered_words(3000), chunk_tokens=200, overlap_tokens=40)

    assert len(chunks) > 5
    for before, after in itertools.pairwise(chunks):
        shared = [w for w in after.split() if w in set(before.split())]
        # The shared words are the end of one chunk and the start of the next.
        assert before.endswith(" ".join(shared))
        assert after.startswith(" ".join(shared))
        assert 40 - 200 // 8 - 2 <= count(" " + " ".join(shared)) <= 40 + 200 // 8 + 2


def test_without_overlap_the_chunks_partition_the_text() -> None:
    text = numbered_words(1000)

    chunks = chunk_text(text, chunk_tokens=64, overlap_tokens=0)

    assert " ".join(chunks) == text
    assert all(count(chunk) <= 64 for chunk in chunks)


def test_a_short_text_is_one_chunk_and_a_blank_one_none() -> None:
    assert chunk_text("  Volcanoes erupt.\n") == ["Volcanoes erupt."]
    assert chunk_text("") == []
    assert chunk_text(" \n\t ") == []


@pytest.mark.parametrize(
    "text",
    [
        "alpha" + " " * 3000 + "omega" + "\n" * 2000 + "last",
        "😀日本語のテキスト" * 300,
        "x" * 5000,
        "naïve café, Zürich. " * 400,
    ],
    ids=["whitespace-runs", "multibyte", "no-whitespace", "accents"],
)
def test_chunks_are_never_empty_or_cut_inside_a_character(text: str) -> None:
    chunks = chunk_text(text, chunk_tokens=50, overlap_tokens=10)

    assert chunks
    assert all(chunk and chunk == chunk.strip() for chunk in chunks)
    assert all("\ufffd" not in chunk for chunk in chunks)
    assert all(count(chunk) <= 50 for chunk in chunks)
    assert all(chunk in text for chunk in chunks)


def test_chunking_is_deterministic_for_any_text() -> None:
    rng = random.Random(7)
    pieces = ["river", "Supercalifragilistic", "café", "😀", "日本", "\n\n", ", ", ". ", "  "]
    for _ in range(50):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 1500)))
        size = rng.choice([8, 16, 50, 200])
        overlap = rng.randint(0, size // 2)
        chunks = chunk_text(text, size, overlap)
        assert chunks == chunk_text(text, size, overlap)
        assert all(chunk and count(chunk) <= size for chunk in chunks)


@pytest.mark.parametrize(("size", "overlap"), [(4, 0), (200, 101), (200, -1)])
def test_bad_chunking_parameters_are_refused(size: int, overlap: int) -> None:
    with pytest.raises(ValueError, match=r"chunk_tokens|overlap_tokens"):
        chunk_text("text", size, overlap)


# Upsert and search


async def test_upsert_reports_progress_after_each_document(
    index: DocumentIndex, embedder: LocalEmbedder, client: aioredis.Redis
) -> None:
    # Small chunks, so one document spans several embedding batches.
    store = KnowledgeStore(index, embedder, client, chunk_tokens=32, overlap_tokens=8)
    long_text = numbered_words(900)
    documents = [
        document("a", TOPICS["volcano"]),
        document("b", long_text),
        document("c", TOPICS["chess"]),
    ]
    expected = [len(chunk_text(d.text, 32, 8)) for d in documents]
    assert expected[1] > 2 * EMBED_BATCH

    events = await upsert_all(store, "acme", "docs", documents)

    assert events == [
        (1, 3, expected[0]),
        (2, 3, expected[0] + expected[1]),
        (3, 3, sum(expected)),
    ]
    assert await index.count("acme", "docs") == sum(expected)
    assert await index.count("acme", "docs", "b") == expected[1]


async def test_search_finds_the_relevant_document_first(store: KnowledgeStore) -> None:
    await upsert_all(store, "acme", "docs", topic_documents(chess={"lang": "en"}))

    for topic, query in QUERIES.items():
        hits = await store.search("acme", "docs", query, top_k=4)
        assert hits[0].document_id == topic, query
        assert len({hit.document_id for hit in hits}) == len(hits) >= 2
        assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)
        # min_score defaults to 0: chunks pointing away from the query are never returned.
        assert all(0.0 <= hit.score <= 1.0 for hit in hits)
        assert hits[0].score > hits[1].score + 0.1

    [best] = await store.search("acme", "docs", QUERIES["chess"], top_k=1)
    assert (best.document_id, best.version, best.chunk) == ("chess", "v1", 0)
    assert best.text == TOPICS["chess"]
    assert best.metadata == {"lang": "en"}
    assert time.time() - 60 < best.update_time <= time.time()


async def test_min_score_drops_weaker_chunks(store: KnowledgeStore) -> None:
    await upsert_all(store, "acme", "docs", topic_documents())
    hits = await store.search("acme", "docs", QUERIES["volcano"], top_k=4)
    between = (hits[0].score + hits[1].score) / 2

    [only] = await store.search("acme", "docs", QUERIES["volcano"], min_score=between)

    assert only.document_id == "volcano"
    assert await store.search("acme", "docs", QUERIES["volcano"], min_score=0.99) == []
    near = await store.search("acme", "docs", QUERIES["volcano"], min_score=hits[-1].score - 1e-4)
    assert [hit.document_id for hit in near] == [hit.document_id for hit in hits]


async def test_max_age_keeps_only_recently_updated_documents(store: KnowledgeStore) -> None:
    now = time.time()
    await upsert_all(
        store,
        "acme",
        "docs",
        [
            document("old-volcano", TOPICS["volcano"], update_time=now - 10 * DAY),
            document("new-volcano", TOPICS["volcano"] + " Some are still active.", update_time=now),
        ],
    )

    recent = await store.search("acme", "docs", QUERIES["volcano"], max_age_s=DAY)
    both = await store.search("acme", "docs", QUERIES["volcano"])

    assert [hit.document_id for hit in recent] == ["new-volcano"]
    assert {hit.document_id for hit in both} == {"old-volcano", "new-volcano"}
    [old] = [hit for hit in both if hit.document_id == "old-volcano"]
    assert old.update_time == pytest.approx(now - 10 * DAY, abs=1e-3)
    assert await store.search("acme", "docs", QUERIES["volcano"], max_age_s=11 * DAY) != []


async def test_the_metadata_filter_matches_every_label(store: KnowledgeStore) -> None:
    await upsert_all(
        store,
        "acme",
        "docs",
        topic_documents(
            volcano={"lang": "en", "team": "geo"},
            sourdough={"lang": "de", "team": "food"},
            chess={"lang": "en", "team": "games"},
            tax={"lang": "en=de", "team": "tax"},
        ),
    )
    query = QUERIES["volcano"]

    english = await store.search("acme", "docs", query, metadata_filter={"lang": "en"})
    games = await store.search(
        "acme", "docs", query, metadata_filter={"lang": "en", "team": "games"}
    )
    none = await store.search("acme", "docs", query, metadata_filter={"lang": "fr"})
    unlabelled = await store.search("acme", "docs", query, metadata_filter={"missing": "x"})

    assert [hit.document_id for hit in english] == ["volcano", "chess"]
    assert [hit.document_id for hit in games] == ["chess"]
    assert games[0].metadata == {"lang": "en", "team": "games"}
    assert none == unlabelled == []
    # A label matches whole: no prefixes, and `=` in a value is just a character.
    assert await store.search("acme", "docs", query, metadata_filter={"team": "ge"}) == []
    bilingual = await store.search("acme", "docs", query, metadata_filter={"lang": "en=de"})
    assert [hit.document_id for hit in bilingual] == ["tax"]


async def test_tenants_never_see_each_other(store: KnowledgeStore, index: DocumentIndex) -> None:
    await upsert_all(store, "acme", "docs", [document("shared-id", TOPICS["volcano"])])
    await upsert_all(store, "globex", "docs", [document("shared-id", TOPICS["chess"])])

    for query in (QUERIES["volcano"], QUERIES["chess"], "shared-id"):
        acme = await store.search("acme", "docs", query)
        globex = await store.search("globex", "docs", query)
        assert {hit.text for hit in acme} <= {TOPICS["volcano"]}
        assert {hit.text for hit in globex} <= {TOPICS["chess"]}
        assert await store.search("initech", "docs", query) == []
    assert (await store.search("acme", "docs", QUERIES["volcano"]))[0].text == TOPICS["volcano"]
    assert (await store.search("globex", "docs", QUERIES["chess"]))[0].text == TOPICS["chess"]

    assert await store.delete("globex", "docs", ["shared-id"]) == ["shared-id"]
    assert await store.search("globex", "docs", QUERIES["chess"]) == []
    assert [d.id for d in (await store.list("acme", "docs", 0, ""))[0]] == ["shared-id"]
    assert await index.count("acme") == 1


async def test_collections_are_separate(store: KnowledgeStore) -> None:
    await upsert_all(store, "acme", "geology", [document("d", TOPICS["volcano"])])
    await upsert_all(store, "acme", "baking", [document("d", TOPICS["sourdough"])])

    [geology] = await store.search("acme", "geology", QUERIES["sourdough"])
    [baking] = await store.search("acme", "baking", QUERIES["volcano"])
    assert (geology.text, baking.text) == (TOPICS["volcano"], TOPICS["sourdough"])
    assert await store.search("acme", "other", QUERIES["volcano"]) == []

    await store.delete("acme", "baking", ["d"])
    assert [hit.text for hit in await store.search("acme", "geology", "lava")] == [
        TOPICS["volcano"]
    ]
    assert (await store.list("acme", "baking", 0, ""))[0] == []


async def test_an_upsert_replaces_every_old_chunk(
    index: DocumentIndex, embedder: LocalEmbedder, client: aioredis.Redis
) -> None:
    store = KnowledgeStore(index, embedder, client, chunk_tokens=32, overlap_tokens=8)
    long_volcano = " ".join([TOPICS["volcano"]] * 6)
    await upsert_all(store, "acme", "docs", [document("guide", long_volcano, version="v1")])
    old_chunks = await index.count("acme", "docs", "guide")
    assert old_chunks > 3

    # A new version, and then the same version again: both replace.
    for version in ("v2", "v2"):
        events = await upsert_all(
            store, "acme", "docs", [document("guide", TOPICS["chess"], version=version)]
        )
        assert events == [(1, 1, 2)]
        assert await index.count("acme", "docs", "guide") == 2

    hits = await store.search("acme", "docs", QUERIES["volcano"], top_k=10)
    assert {hit.version for hit in hits} == {"v2"}
    assert all("lava" not in hit.text for hit in hits)
    [listed] = (await store.list("acme", "docs", 0, ""))[0]
    assert (listed.id, listed.version, listed.chunks) == ("guide", "v2", 2)


async def test_delete_removes_documents_and_reports_those_that_existed(
    store: KnowledgeStore, index: DocumentIndex
) -> None:
    await upsert_all(store, "acme", "docs", topic_documents())

    deleted = await store.delete("acme", "docs", ["tax", "unknown", "volcano", "tax"])

    assert deleted == ["tax", "volcano"]
    assert await store.delete("acme", "docs", ["tax"]) == []
    assert await index.count("acme", "docs", "tax") == 0
    assert await index.count("acme", "docs") == 2
    listed = (await store.list("acme", "docs", 0, ""))[0]
    assert [d.id for d in listed] == ["chess", "sourdough"]
    hits = await store.search("acme", "docs", QUERIES["volcano"], top_k=10)
    assert {hit.document_id for hit in hits} == {"chess", "sourdough"}


async def test_list_pages_through_documents_in_id_order(
    store: KnowledgeStore, client: aioredis.Redis
) -> None:
    ids = ["g", "b", "é-accent", "a", "f", "c/with slash", "d"]
    then = time.time() - DAY
    await upsert_all(
        store,
        "acme",
        "docs",
        [
            document(i, f"Notes number {n} about {i}.", f"v{n}", {"n": str(n)}, then)
            for n, i in enumerate(ids)
        ],
    )

    pages, token = [], ""
    while True:
        page, token = await store.list("acme", "docs", 3, token)
        pages.append([d.id for d in page])
        if not token:
            break

    assert pages == [["a", "b", "c/with slash"], ["d", "f", "g"], ["é-accent"]]
    everything, last = await store.list("acme", "docs", 0, "")
    assert ([d.id for d in everything], last) == (sorted(ids), "")
    clamped, _ = await store.list("acme", "docs", 5000, "")
    assert len(clamped) == len(ids)
    first = everything[0]
    assert (first.version, first.chunks, first.metadata) == ("v3", 1, {"n": "3"})
    assert first.update_time == pytest.approx(then, abs=1e-3)
    # The registry lives where the module docstring says, under the tenant's hash tag.
    assert await client.hlen("strata:kb:{acme}:docs:docs") == len(ids)


async def test_a_page_token_only_continues_its_own_collection(store: KnowledgeStore) -> None:
    await upsert_all(store, "acme", "docs", [document(i, "text " + i) for i in "abc"])
    _, token = await store.list("acme", "docs", 1, "")
    assert token

    for bad in (token, "not a token", "e30", "!!!"):
        with pytest.raises(RequestInvalid) as caught:
            await store.list("acme", "other", 1, bad)
        assert violations(caught) == ["page_token"]


# Writes that race or fail


class GatedIndex:
    """A DocumentIndex that holds writes of version "slow" until released, and fails writes
    of version "broken" after their first step."""

    def __init__(self, inner: DocumentIndex) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.broken_steps = 0

    async def upsert(self, points: Sequence[ChunkPoint]) -> None:
        if any(p.version == "slow" for p in points):
            self.entered.set()
            await self.release.wait()
        if any(p.version == "broken" for p in points):
            self.broken_steps += 1
            if self.broken_steps > 1:
                raise ConnectionError("index down")
        await self.inner.upsert(points)

    async def search(
        self, vector: Sequence[float], tenant: str, collection: str, **kw: Any
    ) -> list[Chunk]:
        return await self.inner.search(vector, tenant, collection, **kw)

    async def delete(
        self,
        tenant: str,
        collection: str,
        document_ids: Sequence[str],
        *,
        seqs: tuple[int, int] | None = None,
    ) -> None:
        await self.inner.delete(tenant, collection, document_ids, seqs=seqs)

    async def count(
        self, tenant: str, collection: str | None = None, document_id: str | None = None
    ) -> int:
        return await self.inner.count(tenant, collection, document_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


@pytest.fixture
def gated(index: DocumentIndex) -> GatedIndex:
    return GatedIndex(index)


@pytest.fixture
def gated_store(
    gated: GatedIndex, embedder: LocalEmbedder, client: aioredis.Redis
) -> KnowledgeStore:
    return KnowledgeStore(gated, embedder, client, chunk_tokens=32, overlap_tokens=8)


async def test_of_two_racing_upserts_the_later_one_wins(
    gated: GatedIndex, gated_store: KnowledgeStore
) -> None:
    long_volcano = " ".join([TOPICS["volcano"]] * 4)
    earlier = asyncio.create_task(
        upsert_all(gated_store, "acme", "docs", [document("d", long_volcano, version="slow")])
    )
    await gated.entered.wait()

    await upsert_all(gated_store, "acme", "docs", [document("d", TOPICS["chess"], version="v2")])
    gated.release.set()
    assert await earlier == [(1, 1, len(chunk_text(long_volcano, 32, 8)))]

    [listed] = (await gated_store.list("acme", "docs", 0, ""))[0]
    assert (listed.version, listed.chunks) == ("v2", 2)
    assert await gated.count("acme", "docs", "d") == 2
    hits = await gated_store.search("acme", "docs", QUERIES["volcano"], top_k=10)
    assert {hit.version for hit in hits} == {"v2"}


async def test_a_delete_wins_over_an_upsert_that_began_before_it(
    gated: GatedIndex, gated_store: KnowledgeStore
) -> None:
    await upsert_all(gated_store, "acme", "docs", [document("d", TOPICS["tax"])])
    upsert = asyncio.create_task(
        upsert_all(gated_store, "acme", "docs", [document("d", TOPICS["chess"], version="slow")])
    )
    await gated.entered.wait()

    assert await gated_store.delete("acme", "docs", ["d"]) == ["d"]
    gated.release.set()
    await upsert

    assert (await gated_store.list("acme", "docs", 0, ""))[0] == []
    assert await gated.count("acme", "docs", "d") == 0
    # A later upsert brings the document back.
    await upsert_all(gated_store, "acme", "docs", [document("d", TOPICS["chess"], version="v3")])
    assert [d.version for d in (await gated_store.list("acme", "docs", 0, ""))[0]] == ["v3"]


async def test_a_failed_write_leaves_the_old_version_whole(
    gated: GatedIndex, gated_store: KnowledgeStore
) -> None:
    await upsert_all(gated_store, "acme", "docs", [document("first", TOPICS["tax"])])
    await upsert_all(gated_store, "acme", "docs", [document("d", TOPICS["volcano"], "v1")])
    before = await gated.count("acme", "docs", "d")
    long_chess = " ".join([TOPICS["chess"]] * 20)  # more than one embedding batch
    assert len(chunk_text(long_chess, 32, 8)) > EMBED_BATCH

    with pytest.raises(ConnectionError):
        await upsert_all(
            gated_store,
            "acme",
            "docs",
            [document("other", TOPICS["sourdough"]), document("d", long_chess, "broken")],
        )

    listed = {d.id: d for d in (await gated_store.list("acme", "docs", 0, ""))[0]}
    assert sorted(listed) == ["d", "first", "other"]
    assert listed["d"].version == "v1"
    assert await gated.count("acme", "docs", "d") == before
    hits = await gated_store.search("acme", "docs", QUERIES["chess"], top_k=10)
    assert "broken" not in {hit.version for hit in hits}


async def test_stopping_an_upsert_early_keeps_the_documents_done(
    index: DocumentIndex, embedder: LocalEmbedder, client: aioredis.Redis
) -> None:
    store = KnowledgeStore(index, embedder, client, chunk_tokens=32, overlap_tokens=8)
    long_text = numbered_words(600)
    documents = [document("a", TOPICS["tax"]), document("b", TOPICS["chess"])]
    documents.append(document("c", long_text))

    progress = store.upsert("acme", "docs", documents)
    assert await anext(progress) == (1, 3, len(chunk_text(TOPICS["tax"], 32, 8)))
    await progress.aclose()

    # "b" was embedded and written with "a" but not yet committed: it goes too.
    assert [d.id for d in (await store.list("acme", "docs", 0, ""))[0]] == ["a"]
    assert await index.count("acme", "docs") == await index.count("acme", "docs", "a")


async def test_aclose_closes_the_index(store: KnowledgeStore) -> None:
    await store.aclose()
    with pytest.raises((RuntimeError, ValueError), match="closed"):
        await store.search("acme", "docs", "anything")


async def test_an_edge_index_keeps_its_chunks_when_reopened(
    tmp_path: Path, embedder: LocalEmbedder, client: aioredis.Redis
) -> None:
    first = KnowledgeStore(EdgeDocumentIndex(tmp_path / "kb", DIMENSIONS), embedder, client)
    await upsert_all(first, "acme", "docs", topic_documents(chess={"lang": "en"}))
    await first.aclose()

    reopened = KnowledgeStore(EdgeDocumentIndex(tmp_path / "kb", DIMENSIONS), embedder, client)
    try:
        hits = await reopened.search(
            "acme", "docs", QUERIES["chess"], metadata_filter={"lang": "en"}
        )
        assert [hit.document_id for hit in hits] == ["chess"]
    finally:
        await reopened.aclose()


# Validation


@pytest.fixture
async def edge_index(tmp_path: Path) -> AsyncIterator[EdgeDocumentIndex]:
    """Validation does not depend on the backend: one is enough."""
    opened = EdgeDocumentIndex(tmp_path / "knowledge", DIMENSIONS)
    yield opened
    await opened.aclose()


@pytest.fixture
def edge_store(
    edge_index: EdgeDocumentIndex, embedder: LocalEmbedder, client: aioredis.Redis
) -> KnowledgeStore:
    return KnowledgeStore(edge_index, embedder, client)


@pytest.mark.parametrize(
    ("collection", "documents", "fields"),
    [
        ("Docs", [document("a", "text")], ["collection"]),
        ("-docs", [document("a", "text")], ["collection"]),
        ("d" * 64, [document("a", "text")], ["collection"]),
        ("docs", [], ["documents"]),
        ("docs", [document("a", "text")] * 2, ["documents[1].id"]),
        ("docs", [document("", "text")], ["documents[0].id"]),
        ("docs", [document("x" * 257, "text")], ["documents[0].id"]),
        ("docs", [document("a", "text", version="")], ["documents[0].version"]),
        ("docs", [document("a", " \n ")], ["documents[0].text"]),
        ("docs", [document("a", "text", metadata={"a.b": "c"})], ["documents[0].metadata['a.b']"]),
        (
            "bad name",
            [document("ok", "text"), document("", "")],
            ["collection", "documents[1].id", "documents[1].text"],
        ),
    ],
)
async def test_bad_upserts_are_refused_whole(
    edge_store: KnowledgeStore,
    edge_index: EdgeDocumentIndex,
    collection: str,
    documents: list[knowledge_pb2.Document],
    fields: list[str],
) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await upsert_all(edge_store, "acme", collection, documents)

    assert violations(caught) == fields
    assert await edge_index.count("acme") == 0


async def test_more_than_a_thousand_documents_are_refused(edge_store: KnowledgeStore) -> None:
    many = [document(f"d{i}", "text") for i in range(1001)]
    with pytest.raises(RequestInvalid) as caught:
        await upsert_all(edge_store, "acme", "docs", many)
    assert violations(caught) == ["documents"]


@pytest.mark.parametrize(
    ("arguments", "fields"),
    [
        ({"query": " "}, ["query"]),
        ({"top_k": 0}, ["top_k"]),
        ({"top_k": 51}, ["top_k"]),
        ({"min_score": -0.1}, ["min_score"]),
        ({"min_score": 1.5}, ["min_score"]),
        ({"min_score": float("nan")}, ["min_score"]),
        ({"max_age_s": 0.0}, ["max_age"]),
        ({"max_age_s": -5.0}, ["max_age"]),
        ({"metadata_filter": {"a b": "x"}}, ["metadata_filter['a b']"]),
        ({"collection": "", "top_k": 99}, ["collection", "top_k"]),
    ],
)
async def test_bad_searches_are_refused(
    edge_store: KnowledgeStore, arguments: dict[str, Any], fields: list[str]
) -> None:
    call: dict[str, Any] = {"collection": "docs", "query": "lava"} | arguments
    with pytest.raises(RequestInvalid) as caught:
        await edge_store.search("acme", **call)
    assert violations(caught) == fields


@pytest.mark.parametrize(
    ("collection", "ids", "fields"),
    [
        ("docs", [], ["document_ids"]),
        ("docs", ["ok", ""], ["document_ids[1]"]),
        ("docs", ["y" * 257], ["document_ids[0]"]),
        ("no/slash", ["a"], ["collection"]),
    ],
)
async def test_bad_deletes_are_refused(
    edge_store: KnowledgeStore, collection: str, ids: list[str], fields: list[str]
) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await edge_store.delete("acme", collection, ids)
    assert violations(caught) == fields


async def test_bad_lists_are_refused(edge_store: KnowledgeStore) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await edge_store.list("acme", "docs", -1, "garbage")
    assert violations(caught) == ["page_size", "page_token"]
