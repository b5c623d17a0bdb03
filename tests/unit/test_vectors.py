"""The vector index on real engines: qdrant-edge on disk, and qdrant-client's local mode.

Every behaviour runs on both backends, so the embedded default and production agree.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.cache.vectors import EdgeIndex, Entry, QdrantIndex, VectorIndex

DIMENSIONS = 4
NOW = 1_000.0


def unit(*components: float) -> list[float]:
    norm = math.sqrt(sum(c * c for c in components))
    return [c / norm for c in components]


def angled(degrees: float) -> list[float]:
    """A unit vector at `degrees` from (1, 0, 0, 0), in the plane of the first two axes."""
    radians = math.radians(degrees)
    return [math.cos(radians), math.sin(radians), 0.0, 0.0]


def entry(**overrides: Any) -> Entry:
    fields: dict[str, Any] = {
        "id": str(uuid.uuid4()),
        "vector": unit(1, 0, 0, 0),
        "scope": "scope-a",
        "tenant": "tenant-1",
        "model": "model-1",
        "digest": "digest-" + uuid.uuid4().hex[:8],
        "query": "what is strata",
        "created_at": NOW - 10,
        "expires_at": NOW + 3600,
        "doc_ids": (),
    }
    fields.update(overrides)
    return Entry(**fields)


async def open_index(backend: str, tmp_path: Path) -> VectorIndex:
    if backend == "edge":
        return EdgeIndex(tmp_path / "vectors", DIMENSIONS)
    index = QdrantIndex(DIMENSIONS, location=":memory:")
    await index.start()
    return index


@pytest.fixture(params=["edge", "qdrant"])
async def index(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[VectorIndex]:
    opened = await open_index(request.param, tmp_path)
    yield opened
    await opened.aclose()


async def test_a_hit_stays_inside_its_scope(index: VectorIndex) -> None:
    stored = entry(scope="scope-a")
    await index.upsert([stored])

    assert await index.search(stored.vector, "scope-b", NOW, 5) == []
    [match] = await index.search(stored.vector, "scope-a", NOW, 5)
    assert match.id == stored.id
    assert match.score == pytest.approx(1.0, abs=1e-6)
    assert (match.digest, match.query, match.created_at) == (
        stored.digest,
        stored.query,
        stored.created_at,
    )


async def test_a_search_right_after_upsert_sees_the_entry(index: VectorIndex) -> None:
    for n in range(5):
        stored = entry(vector=angled(n * 10))
        await index.upsert([stored])
        matches = await index.search(stored.vector, "scope-a", NOW, 1)
        assert [m.id for m in matches] == [stored.id]


async def test_expired_entries_are_never_returned(index: VectorIndex) -> None:
    expired = entry(expires_at=NOW - 1)
    expiring_now = entry(expires_at=NOW)
    alive = entry(expires_at=NOW + 0.001)
    await index.upsert([expired, expiring_now, alive])

    matches = await index.search(unit(1, 0, 0, 0), "scope-a", NOW, 10)

    assert [m.id for m in matches] == [alive.id]


async def test_nearest_come_first_with_their_cosine(index: VectorIndex) -> None:
    angles = {0: entry(vector=angled(0)), 60: entry(vector=angled(60))}
    angles |= {120: entry(vector=angled(120)), 30: entry(vector=angled(30))}
    await index.upsert(list(angles.values()))

    matches = await index.search(angled(10), "scope-a", NOW, 3)

    assert [m.id for m in matches] == [angles[a].id for a in (0, 30, 60)]
    for match, angle in zip(matches, (0, 30, 60), strict=True):
        assert match.score == pytest.approx(math.cos(math.radians(angle - 10)), abs=1e-5)
    opposite = await index.search(angled(180), "scope-a", NOW, 4)
    assert [m.id for m in opposite] == [angles[a].id for a in (120, 60, 30, 0)]
    assert opposite[-1].score == pytest.approx(-1.0, abs=1e-5)
    assert all(-1.0 <= m.score <= 1.0 for m in opposite)


async def test_an_upsert_of_an_existing_id_replaces_it(index: VectorIndex) -> None:
    first = entry(scope="scope-a", digest="old", vector=angled(0))
    await index.upsert([first])
    second = entry(id=first.id.upper(), scope="scope-b", digest="new", vector=angled(90))
    await index.upsert([second])

    assert await index.count() == 1
    assert await index.search(angled(0), "scope-a", NOW, 5) == []
    [match] = await index.search(angled(90), "scope-b", NOW, 5)
    assert (match.id, match.digest) == (first.id, "new")


async def test_count_is_per_tenant(index: VectorIndex) -> None:
    await index.upsert([entry(tenant="tenant-1") for _ in range(3)])
    await index.upsert([entry(tenant="tenant-2", expires_at=NOW - 1) for _ in range(2)])

    assert await index.count() == 5
    assert await index.count("tenant-1") == 3
    assert await index.count("tenant-2") == 2
    assert await index.count("tenant-3") == 0


STORED = {
    # name: (tenant, model, created_at, expires_at, doc_ids)
    "a": ("t1", "m1", 100.0, 1000.0, ("d1",)),
    "b": ("t1", "m2", 200.0, 2000.0, ("d1", "d2")),
    "c": ("t2", "m1", 300.0, 500.0, ("d2",)),
    "d": ("t2", "m2", 400.0, 3000.0, ()),
}
IDS = {name: str(uuid.UUID(int=n + 1)) for n, name in enumerate(STORED)}


@pytest.mark.parametrize(
    ("conditions", "removed"),
    [
        ({"tenant": "t1"}, "ab"),
        ({"model": "m1"}, "ac"),
        ({"doc_id": "d1"}, "ab"),
        ({"doc_id": "d2"}, "bc"),
        ({"older_than": 300.0}, "ab"),
        ({"ids": [IDS["a"], IDS["d"]]}, "ad"),
        ({"ids": []}, ""),
        ({"expired_before": 1000.0}, "ac"),
        ({"tenant": "t1", "model": "m2"}, "b"),
        ({"tenant": "t2", "doc_id": "d2", "older_than": 350.0}, "c"),
        ({"ids": [IDS["a"], IDS["b"], IDS["c"]], "model": "m1", "expired_before": 2000.0}, "ac"),
        ({"tenant": "t3"}, ""),
        ({"tenant": "t1", "model": "m1", "doc_id": "d2"}, ""),
    ],
)
async def test_delete_removes_what_matches_every_condition(
    index: VectorIndex, conditions: dict[str, Any], removed: str
) -> None:
    await index.upsert(
        [
            entry(
                id=IDS[name],
                digest=f"digest-{name}",
                scope="s",
                vector=angled(10 * n),
                tenant=tenant,
                model=model,
                created_at=created_at,
                expires_at=expires_at,
                doc_ids=doc_ids,
            )
            for n, (name, (tenant, model, created_at, expires_at, doc_ids)) in enumerate(
                STORED.items()
            )
        ]
    )

    digests = await index.delete(**conditions)

    assert sorted(digests) == [f"digest-{name}" for name in removed]
    assert await index.count() == len(STORED) - len(removed)
    left = await index.search(angled(0), "s", 0.0, 10)
    assert sorted(m.digest for m in left) == [f"digest-{n}" for n in STORED if n not in removed]


async def test_delete_needs_a_condition(index: VectorIndex) -> None:
    await index.upsert([entry()])

    with pytest.raises(ValueError, match="at least one condition"):
        await index.delete()
    assert await index.count() == 1


async def test_delete_of_many_entries_spans_several_steps(index: VectorIndex) -> None:
    doomed = [entry(tenant="big", digest=f"d{n}", vector=angled(n % 90)) for n in range(300)]
    await index.upsert([*doomed, entry(tenant="small")])

    digests = await index.delete(tenant="big")

    assert sorted(digests) == sorted(e.digest for e in doomed)
    assert await index.count() == 1
    assert await index.count("big") == 0


async def test_malformed_input_is_refused(index: VectorIndex) -> None:
    with pytest.raises(ValueError, match="UUID"):
        await index.upsert([entry(id="not-a-uuid")])
    with pytest.raises(ValueError, match="dimensions"):
        await index.upsert([entry(vector=[1.0, 0.0])])
    with pytest.raises(ValueError, match="dimensions"):
        await index.search([1.0, 0.0, 0.0], "scope-a", NOW, 5)
    with pytest.raises(ValueError, match="UUID"):
        await index.delete(ids=["nope"])
    assert await index.count() == 0


async def test_edge_index_reopens_with_its_entries(tmp_path: Path) -> None:
    stored = entry(doc_ids=("d1",))
    first = EdgeIndex(tmp_path / "vectors", DIMENSIONS)
    await first.upsert([stored, entry(tenant="tenant-2", vector=angled(90))])
    await first.aclose()

    reopened = EdgeIndex(tmp_path / "vectors", DIMENSIONS)
    try:
        assert await reopened.count() == 2
        [match] = await reopened.search(stored.vector, stored.scope, NOW, 1)
        assert (match.id, match.digest) == (stored.id, stored.digest)
        assert await reopened.delete(doc_id="d1") == [stored.digest]
    finally:
        await reopened.aclose()


async def test_edge_index_refuses_a_shard_of_other_dimensions(tmp_path: Path) -> None:
    await EdgeIndex(tmp_path / "vectors", DIMENSIONS).aclose()

    with pytest.raises(RuntimeError, match="cannot open the vector index"):
        EdgeIndex(tmp_path / "vectors", DIMENSIONS * 2)


async def test_edge_index_refuses_calls_once_closed(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path / "vectors", DIMENSIONS)
    await index.aclose()
    await index.aclose()

    with pytest.raises(RuntimeError, match="closed"):
        await index.search(unit(1, 0, 0, 0), "scope-a", NOW, 5)


async def test_edge_index_optimize_keeps_entries_searchable(tmp_path: Path) -> None:
    index = EdgeIndex(tmp_path / "vectors", DIMENSIONS)
    try:
        kept = entry(vector=angled(45))
        await index.upsert([kept, entry(tenant="gone")])
        await index.delete(tenant="gone")
        await index.optimize()
        [match] = await index.search(angled(45), kept.scope, NOW, 5)
        assert match.id == kept.id
    finally:
        await index.aclose()


async def test_qdrant_index_start_is_idempotent_and_keeps_entries(tmp_path: Path) -> None:
    stored = entry()
    first = QdrantIndex(DIMENSIONS, path=tmp_path / "qdrant")
    await first.start()
    await first.start()
    await first.upsert([stored])
    await first.aclose()

    reopened = QdrantIndex(DIMENSIONS, path=tmp_path / "qdrant")
    try:
        await reopened.start()
        assert await reopened.count() == 1
    finally:
        await reopened.aclose()


async def test_qdrant_index_refuses_a_collection_of_other_dimensions(tmp_path: Path) -> None:
    first = QdrantIndex(DIMENSIONS, path=tmp_path / "qdrant")
    await first.start()
    await first.aclose()

    other = QdrantIndex(DIMENSIONS * 2, path=tmp_path / "qdrant")
    try:
        with pytest.raises(ValueError, match="dimensional"):
            await other.start()
    finally:
        await other.aclose()


def test_qdrant_index_needs_exactly_one_location() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        QdrantIndex(DIMENSIONS)
    with pytest.raises(ValueError, match="exactly one"):
        QdrantIndex(DIMENSIONS, url="http://127.0.0.1:6333", location=":memory:")
