"""A collection on a Qdrant server, shared by the cache's index and the knowledge index.

Every call carries a deadline of `timeout_s`; a server that does not answer in time, cannot
be reached or answers 5xx/429 raises DependencyUnavailable("qdrant"). A server that does
not answer at start-up is not fatal: the service starts without it (semantic lookups miss,
retrieval follows its failure policy) and every later call first tries again to prepare
the collection.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from qdrant_client import AsyncQdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from services.common.errors import DependencyUnavailable

log = logging.getLogger(__name__)

PayloadSchemas = dict[str, models.PayloadSchemaType | models.KeywordIndexParams]


class QdrantCollection:
    """One cosine collection of `dimensions`-long vectors, with its payload indexes."""

    COLLECTION = "strata"
    """The collection's name unless one is given."""
    TIMEOUT_S = 2.0
    """The deadline of each call unless one is given."""

    def __init__(
        self,
        dimensions: int,
        *,
        url: str | None = None,
        location: str | None = None,
        path: Path | None = None,
        collection: str | None = None,
        api_key: str | None = None,
        timeout_s: float | None = None,
    ) -> None:
        collection = collection or self.COLLECTION
        timeout_s = self.TIMEOUT_S if timeout_s is None else timeout_s
        if sum(option is not None for option in (url, location, path)) != 1:
            raise ValueError(f"{type(self).__name__} needs exactly one of url, location or path")
        self._dimensions = dimensions
        self._collection = collection
        self._timeout_s = timeout_s
        # Local mode runs in this process and ignores payload indexes (with a warning).
        self._local = url is None
        self._prepared = False
        self._preparing = asyncio.Lock()
        self._client = AsyncQdrantClient(
            url=url,
            location=location,
            path=None if path is None else str(path),
            api_key=api_key,
            timeout=math.ceil(timeout_s),
            # The check runs a blocking request in a thread and only warns; start() finds
            # out whether the server answers.
            check_compatibility=False,
        )

    def payload_schemas(self) -> PayloadSchemas:
        """The payload fields to index, and how."""
        return {}

    @asynccontextmanager
    async def _deadline(self) -> AsyncIterator[None]:
        try:
            async with asyncio.timeout(self._timeout_s):
                yield
        except (TimeoutError, ResponseHandlingException) as err:
            raise DependencyUnavailable("qdrant") from err
        except UnexpectedResponse as err:
            if err.status_code is not None and (err.status_code >= 500 or err.status_code == 429):
                raise DependencyUnavailable("qdrant") from err
            raise

    async def start(self) -> None:
        """Creates the collection and its payload indexes where missing (idempotent)."""
        try:
            await self._ready()
        except DependencyUnavailable as err:
            log.warning("qdrant does not answer (%s); preparing the collection later", err)

    async def _ready(self) -> None:
        """Prepares the collection once; DependencyUnavailable while the server is away."""
        if self._prepared:
            return
        async with self._preparing:
            if not self._prepared:
                await self._prepare()
                self._prepared = True

    async def _prepare(self) -> None:
        async with self._deadline():
            exists = await self._client.collection_exists(self._collection)
        if not exists:
            try:
                async with self._deadline():
                    await self._client.create_collection(
                        self._collection,
                        vectors_config=models.VectorParams(
                            size=self._dimensions, distance=models.Distance.COSINE
                        ),
                    )
            except UnexpectedResponse as err:
                if err.status_code != 409:  # another replica created it first
                    raise
        async with self._deadline():
            info = await self._client.get_collection(self._collection)
        vectors = info.config.params.vectors
        if isinstance(vectors, models.VectorParams) and vectors.size != self._dimensions:
            raise ValueError(
                f"collection {self._collection} holds {vectors.size}-dimensional vectors, "
                f"the index needs {self._dimensions}"
            )
        if self._local:
            return
        for field, schema in self.payload_schemas().items():
            if field not in info.payload_schema:
                async with self._deadline():
                    await self._client.create_payload_index(
                        self._collection, field, field_schema=schema, wait=True
                    )
