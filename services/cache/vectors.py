"""The vector index of the semantic cache: the stored questions nearest to a new one.

Every entry is a point whose id is the entry's UUID, whose vector is the question's unit
embedding and whose payload carries what filters and guards need. A search is always
filtered by `scope` (an opaque digest of tenant, model, parameters, prompt, tools and
documents), so a hit can never cross scopes, and by `expires_at`, so an expired entry is
never served even before a sweep deletes it.

Two backends behind one protocol:

    VectorIndex (Protocol)
    ├── EdgeIndex     Qdrant's engine in-process (qdrant-edge-py), one shard on disk:
    │                 the embedded default (`make run`, tests, single-node deployments)
    └── QdrantIndex   a Qdrant server through qdrant-client's AsyncQdrantClient:
                      production (or local mode, for tests)

Both keep keyword indexes on scope/tenant/model/doc_ids and float indexes on
created_at/expires_at, and measure cosine similarity.

EdgeIndex and the event loop: qdrant-edge-py 0.9 holds the GIL for the whole of every
call (measured: a 10 s `optimize` run in a worker thread stops every other thread of the
process for 10 s). A worker thread therefore frees nothing, so calls run inline and bulk
work is cut into steps of a few milliseconds with a yield to the loop between them. The
shard is thread-safe (concurrent updates from several threads lose nothing), but since the
GIL serialises its calls anyway nothing here uses threads. Building the HNSW graph is the
one step that cannot be cut: `EdgeIndex.optimize` is never called on its own; until it
runs, a search scores the scope's entries exactly, which the scope's payload index keeps
cheap: 0.6 ms at 100k entries when a scope holds 1k of them, ~20 ms when it holds 50k.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import qdrant_edge as edge
from qdrant_client import models

from services.common.qdrant import PayloadSchemas, QdrantCollection

if TYPE_CHECKING:
    from qdrant_client.conversions.common_types import PointId as QdrantPointId
    from qdrant_edge import ConditionType as EdgeCondition

log = logging.getLogger(__name__)

KEYWORD_FIELDS = ("scope", "tenant", "model", "doc_ids")
"""Payload fields filtered by exact value (doc_ids is a list: a match on any element)."""
FLOAT_FIELDS = ("created_at", "expires_at")
"""Payload fields filtered by range (unix seconds)."""
MATCH_FIELDS = ["digest", "query", "created_at"]
"""The payload a search returns: what a `Match` needs, nothing more."""


@dataclass(frozen=True, slots=True)
class Entry:
    """A stored question: where its answer is and who may reuse it until when."""

    id: str
    """UUID string, the point id (any UUID spelling; stored in canonical lower-case form)."""
    vector: list[float]
    """Unit embedding of the question."""
    scope: str
    """Opaque hex digest: a hit is only possible inside one scope."""
    tenant: str
    model: str
    digest: str
    """Key of the stored answer (in Redis)."""
    query: str
    """Normalised text of the question, for the guards."""
    created_at: float
    """Unix seconds."""
    expires_at: float
    """Unix seconds; from this instant on the entry is never returned."""
    doc_ids: tuple[str, ...] = ()
    """Documents the answer used; updating one of them deletes the entry."""


@dataclass(frozen=True, slots=True)
class Match:
    """A stored question near the asked one."""

    id: str
    score: float
    """Cosine similarity, in [-1, 1]."""
    digest: str
    query: str
    created_at: float


class VectorIndex(Protocol):
    """Nearest stored questions within one scope, and deletion by who or what they used."""

    async def upsert(self, entries: Sequence[Entry]) -> None:
        """Stores the entries; an entry whose id exists replaces it. Visible on return."""
        ...

    async def search(
        self, vector: Sequence[float], scope: str, now: float, limit: int
    ) -> list[Match]:
        """Nearest first: at most `limit` entries of `scope` with `expires_at > now`."""
        ...

    async def delete(
        self,
        *,
        tenant: str | None = None,
        model: str | None = None,
        older_than: float | None = None,
        doc_id: str | None = None,
        ids: Sequence[str] | None = None,
        expired_before: float | None = None,
    ) -> list[str]:
        """Removes every entry matching all the given conditions; returns their digests.

        `older_than`: created_at < t. `expired_before`: expires_at <= t (exactly the entries
        a search at `now=t` no longer returns). `doc_id`: the entry used that document.
        At least one condition is required (ValueError otherwise).
        """
        ...

    async def count(self, tenant: str | None = None) -> int:
        """Entries stored (of one tenant, or all), expired ones included until deleted."""
        ...

    async def aclose(self) -> None:
        """Releases the index (EdgeIndex: flushes the shard to disk)."""
        ...


@dataclass(frozen=True, slots=True)
class _Selection:
    """The conditions of one `delete`, checked; translated by each backend."""

    tenant: str | None
    model: str | None
    older_than: float | None
    doc_id: str | None
    ids: list[str] | None
    expired_before: float | None

    @classmethod
    def of(
        cls,
        *,
        tenant: str | None,
        model: str | None,
        older_than: float | None,
        doc_id: str | None,
        ids: Sequence[str] | None,
        expired_before: float | None,
    ) -> _Selection:
        conditions = (tenant, model, older_than, doc_id, ids, expired_before)
        if all(condition is None for condition in conditions):
            raise ValueError("delete needs at least one condition")
        return cls(
            tenant=tenant,
            model=model,
            older_than=older_than,
            doc_id=doc_id,
            ids=None if ids is None else [_point_id(i) for i in ids],
            expired_before=expired_before,
        )

    @property
    def matches_nothing(self) -> bool:
        return self.ids is not None and not self.ids


def _point_id(value: str) -> str:
    """The canonical form of a UUID string, so ids read back equal ids written."""
    try:
        return str(uuid.UUID(value))
    except (ValueError, AttributeError, TypeError) as err:
        raise ValueError(f"entry id must be a UUID string, got {value!r}") from err


def _check_dimensions(vector: Sequence[float], dimensions: int) -> None:
    if len(vector) != dimensions:
        raise ValueError(f"vector has {len(vector)} dimensions, the index {dimensions}")


def _checked_vector(vector: Sequence[float], dimensions: int) -> list[float]:
    _check_dimensions(vector, dimensions)
    return [float(x) for x in vector]


def _payload(entry: Entry) -> dict[str, Any]:
    return {
        "scope": entry.scope,
        "tenant": entry.tenant,
        "model": entry.model,
        "digest": entry.digest,
        "query": entry.query,
        # Floats always: an int would be stored as an integer and miss the float index.
        "created_at": float(entry.created_at),
        "expires_at": float(entry.expires_at),
        "doc_ids": list(entry.doc_ids),
    }


def _match(point_id: object, score: float, payload: dict[str, Any] | None) -> Match:
    payload = payload or {}
    return Match(
        id=str(point_id),
        # Float rounding gives 1.0000001 for identical vectors; the contract is [-1, 1].
        score=min(1.0, max(-1.0, float(score))),
        digest=str(payload["digest"]),
        query=str(payload["query"]),
        created_at=float(payload["created_at"]),
    )


class EdgeIndex:
    """Qdrant's engine in-process: one shard on disk under `path` (created if missing)."""

    UPSERT_STEP = 64
    """Points per engine call: ~2 ms each at 384 dimensions, so the loop stays responsive."""
    DELETE_STEP = 128
    """Points scanned and deleted per engine call: ~4 ms each at 100k entries."""

    def __init__(self, path: Path, dimensions: int) -> None:
        self._path = path
        self._dimensions = dimensions
        config = edge.EdgeConfig(
            vectors=edge.EdgeVectorParams(size=dimensions, distance=edge.Distance.Cosine),
            hnsw_config=edge.HnswIndexConfig(m=16, ef_construct=100, full_scan_threshold=10_000),
        )
        try:
            if (path / "edge_config.json").exists():
                # Passing the config makes the engine refuse a shard of other dimensions.
                shard = edge.EdgeShard.load(str(path), config)
            else:
                path.mkdir(parents=True, exist_ok=True)
                shard = edge.EdgeShard.create(str(path), config)
        except Exception as err:
            raise RuntimeError(f"cannot open the vector index at {path}: {err}") from err
        self._shard: edge.EdgeShard | None = shard
        self._ensure_payload_indexes(shard)

    @staticmethod
    def _ensure_payload_indexes(shard: edge.EdgeShard) -> None:
        existing = shard.info().payload_schema
        for field in KEYWORD_FIELDS:
            if field not in existing:
                # is_tenant: every search filters by scope, so the engine may lay out
                # storage by it when it optimises.
                schema = edge.KeywordIndexParams(is_tenant=field == "scope")
                shard.update(edge.UpdateOperation.create_field_index(field, schema))
        for field in FLOAT_FIELDS:
            if field not in existing:
                shard.update(
                    edge.UpdateOperation.create_field_index(field, edge.PayloadSchemaType.Float)
                )

    def _open_shard(self) -> edge.EdgeShard:
        if self._shard is None:
            raise RuntimeError(f"the vector index at {self._path} is closed")
        return self._shard

    async def upsert(self, entries: Sequence[Entry]) -> None:
        """Stores the entries in steps of UPSERT_STEP; each is searchable once its step ends.

        Every entry is checked before the first is written, so bad input changes nothing.
        """
        ids = [_point_id(entry.id) for entry in entries]
        for entry in entries:
            _check_dimensions(entry.vector, self._dimensions)
        for start in range(0, len(entries), self.UPSERT_STEP):
            if start:
                await asyncio.sleep(0)
            step = [
                edge.Point(point_id, entry.vector, _payload(entry))
                for point_id, entry in zip(
                    ids[start : start + self.UPSERT_STEP],
                    entries[start : start + self.UPSERT_STEP],
                    strict=True,
                )
            ]
            self._open_shard().update(edge.UpdateOperation.upsert_points(step))

    async def search(
        self, vector: Sequence[float], scope: str, now: float, limit: int
    ) -> list[Match]:
        """Nearest unexpired entries of `scope`, inline (well under 1 ms for common scopes)."""
        if limit <= 0:
            return []
        query = edge.QueryRequest(
            limit=limit,
            query=edge.Query.Nearest(_checked_vector(vector, self._dimensions)),
            filter=edge.Filter(
                must=[
                    edge.FieldCondition("scope", match=edge.MatchValue(scope)),
                    edge.FieldCondition("expires_at", range=edge.RangeFloat(gt=float(now))),
                ]
            ),
            with_payload=edge.PayloadSelector.Include(MATCH_FIELDS),
            with_vector=False,
        )
        points = self._open_shard().query(query)
        return [_match(point.id, point.score, point.payload) for point in points]

    async def delete(
        self,
        *,
        tenant: str | None = None,
        model: str | None = None,
        older_than: float | None = None,
        doc_id: str | None = None,
        ids: Sequence[str] | None = None,
        expired_before: float | None = None,
    ) -> list[str]:
        """Removes the matching entries in steps of DELETE_STEP; returns their digests."""
        selection = _Selection.of(
            tenant=tenant,
            model=model,
            older_than=older_than,
            doc_id=doc_id,
            ids=ids,
            expired_before=expired_before,
        )
        if selection.matches_nothing:
            return []
        selected = edge.Filter(must=self._conditions(selection))
        digests: list[str] = []
        offset: edge.PointId | None = None
        while True:
            shard = self._open_shard()
            # Scan and delete in one step with no await between: the step removes exactly
            # the points whose digests it reports.
            records, offset = shard.scroll(
                edge.ScrollRequest(
                    offset=offset,
                    limit=self.DELETE_STEP,
                    filter=selected,
                    with_payload=edge.PayloadSelector.Include(["digest"]),
                    with_vector=False,
                )
            )
            if records:
                shard.update(edge.UpdateOperation.delete_points([r.id for r in records]))
                digests.extend(str((r.payload or {})["digest"]) for r in records)
            if offset is None:
                return digests
            await asyncio.sleep(0)

    @staticmethod
    def _conditions(selection: _Selection) -> list[EdgeCondition]:
        conditions: list[EdgeCondition] = []
        for field, value in (
            ("tenant", selection.tenant),
            ("model", selection.model),
            ("doc_ids", selection.doc_id),
        ):
            if value is not None:
                conditions.append(edge.FieldCondition(field, match=edge.MatchValue(value)))
        if selection.older_than is not None:
            conditions.append(
                edge.FieldCondition(
                    "created_at", range=edge.RangeFloat(lt=float(selection.older_than))
                )
            )
        if selection.expired_before is not None:
            conditions.append(
                edge.FieldCondition(
                    "expires_at", range=edge.RangeFloat(lte=float(selection.expired_before))
                )
            )
        if selection.ids is not None:
            conditions.append(edge.HasIdCondition(set(selection.ids)))
        return conditions

    async def count(self, tenant: str | None = None) -> int:
        """Entries stored; a tenant's count costs ~0.2 µs per entry of that tenant."""
        shard = self._open_shard()
        if tenant is None:
            return shard.info().points_count
        only_tenant = edge.Filter(
            must=[edge.FieldCondition("tenant", match=edge.MatchValue(tenant))]
        )
        return shard.count(edge.CountRequest(exact=True, filter=only_tenant))

    async def optimize(self) -> bool:
        """Vacuums deleted points and builds the HNSW graph; True if anything changed.

        Blocks the whole process while it runs (the engine holds the GIL): measured on two
        cores, 5-8 s at 10k entries and ~7 min at 100k. Call it only where nothing is
        waiting, e.g. before the service reports SERVING.
        """
        return self._open_shard().optimize()

    async def aclose(self) -> None:
        """Flushes the shard to disk and closes it; later calls raise RuntimeError."""
        shard, self._shard = self._shard, None
        if shard is not None:
            shard.flush()
            shard.close()


class QdrantIndex(QdrantCollection):
    """A collection on a Qdrant server (`url`), or in qdrant-client's local mode for tests.

    Every call carries a deadline of `timeout_s`; a server that does not answer in time,
    cannot be reached or answers 5xx/429 raises DependencyUnavailable("qdrant").
    """

    PAGE = 256
    """Points per request when upserting, and per scan when deleting."""

    COLLECTION = "strata_cache"
    TIMEOUT_S = 2.0

    def payload_schemas(self) -> PayloadSchemas:
        return {
            "scope": models.KeywordIndexParams(
                type=models.KeywordIndexType.KEYWORD, is_tenant=True
            ),
            **{field: models.PayloadSchemaType.KEYWORD for field in KEYWORD_FIELDS[1:]},
            **{field: models.PayloadSchemaType.FLOAT for field in FLOAT_FIELDS},
        }

    async def upsert(self, entries: Sequence[Entry]) -> None:
        """Stores the entries, PAGE per request, each applied before the next is sent."""
        await self._ready()
        points = [
            models.PointStruct(
                id=_point_id(entry.id),
                vector=_checked_vector(entry.vector, self._dimensions),
                payload=_payload(entry),
            )
            for entry in entries
        ]
        for start in range(0, len(points), self.PAGE):
            async with self._deadline():
                await self._client.upsert(
                    self._collection, points=points[start : start + self.PAGE], wait=True
                )

    async def search(
        self, vector: Sequence[float], scope: str, now: float, limit: int
    ) -> list[Match]:
        """Nearest unexpired entries of `scope`."""
        await self._ready()
        if limit <= 0:
            return []
        unexpired_in_scope = models.Filter(
            must=[
                models.FieldCondition(key="scope", match=models.MatchValue(value=scope)),
                models.FieldCondition(key="expires_at", range=models.Range(gt=float(now))),
            ]
        )
        async with self._deadline():
            response = await self._client.query_points(
                self._collection,
                query=_checked_vector(vector, self._dimensions),
                query_filter=unexpired_in_scope,
                limit=limit,
                with_payload=MATCH_FIELDS,
                with_vectors=False,
            )
        return [_match(point.id, point.score, point.payload) for point in response.points]

    async def delete(
        self,
        *,
        tenant: str | None = None,
        model: str | None = None,
        older_than: float | None = None,
        doc_id: str | None = None,
        ids: Sequence[str] | None = None,
        expired_before: float | None = None,
    ) -> list[str]:
        """Removes the matching entries page by page; returns the digests the scan found.

        Each page is deleted by its ids *and* the conditions, so an entry that another
        writer replaced meanwhile by one that no longer matches is kept.
        """
        await self._ready()
        selection = _Selection.of(
            tenant=tenant,
            model=model,
            older_than=older_than,
            doc_id=doc_id,
            ids=ids,
            expired_before=expired_before,
        )
        if selection.matches_nothing:
            return []
        conditions = self._conditions(selection)
        digests: list[str] = []
        offset: QdrantPointId | None = None
        while True:
            async with self._deadline():
                records, offset = await self._client.scroll(
                    self._collection,
                    scroll_filter=models.Filter(must=conditions),
                    limit=self.PAGE,
                    offset=offset,
                    with_payload=["digest"],
                    with_vectors=False,
                )
            if records:
                page: list[models.Condition] = [
                    models.HasIdCondition(has_id=[r.id for r in records]),
                    *conditions,
                ]
                async with self._deadline():
                    await self._client.delete(
                        self._collection,
                        points_selector=models.FilterSelector(filter=models.Filter(must=page)),
                        wait=True,
                    )
                digests.extend(str((r.payload or {})["digest"]) for r in records)
            if offset is None:
                return digests

    @staticmethod
    def _conditions(selection: _Selection) -> list[models.Condition]:
        conditions: list[models.Condition] = []
        for field, value in (
            ("tenant", selection.tenant),
            ("model", selection.model),
            ("doc_ids", selection.doc_id),
        ):
            if value is not None:
                conditions.append(
                    models.FieldCondition(key=field, match=models.MatchValue(value=value))
                )
        if selection.older_than is not None:
            conditions.append(
                models.FieldCondition(
                    key="created_at", range=models.Range(lt=float(selection.older_than))
                )
            )
        if selection.expired_before is not None:
            conditions.append(
                models.FieldCondition(
                    key="expires_at", range=models.Range(lte=float(selection.expired_before))
                )
            )
        if selection.ids is not None:
            conditions.append(models.HasIdCondition(has_id=list(selection.ids)))
        return conditions

    async def count(self, tenant: str | None = None) -> int:
        """Entries stored (of one tenant, or all)."""
        await self._ready()
        only_tenant = (
            None
            if tenant is None
            else models.Filter(
                must=[models.FieldCondition(key="tenant", match=models.MatchValue(value=tenant))]
            )
        )
        async with self._deadline():
            result = await self._client.count(
                self._collection, count_filter=only_tenant, exact=True
            )
        return result.count

    async def aclose(self) -> None:
        """Closes the client's connections."""
        await self._client.close()
