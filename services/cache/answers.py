"""The answer cache: exact reuse, then reuse by meaning, then a miss.

    Lookup: normalised exact match (Redis GET)
            → if semantic reuse applies: embed the last user turn, search the vector index
              inside the request's semantic scope, and take the closest candidate at or
              above the similarity threshold that passes every guard
            → miss
    Store:  the answer in Redis (with its TTL) and an entry in the vector index

Semantic reuse applies unless the request or route turned it off, the temperature is above
the bound (unless the route allows it), there is no user turn, or that turn is longer than
`max_semantic_chars`: the embedder sees a question's first few hundred words only, so two
long questions alike at their start embed alike whatever follows and the guards alone would
tell them apart, at a cost that grows with their length on the cache's event loop (a
megabyte took them seconds). A long question is reused exactly only. A failing or slow vector
index or embedder makes the lookup a miss (within `semantic_timeout_s`), never an error.

Each tenant is capped in entries and bytes; past a cap the oldest entries go first. The
answers live in Redis under `strata:cache:exact:<tenant>:<digest>`; per tenant a sorted set
`strata:cache:entries:<tenant>` (digest -> stored at) and a hash `...:sizes:<tenant>` (digest
-> bytes, plus `total`) make eviction and invalidation by tenant or age exact.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as redis

from services.cache import guards
from services.cache.scope import (
    check_scope,
    check_store,
    entry_id,
    last_user_turn,
    redis_key,
    semantic_scope,
    temperature_of,
)
from services.cache.stats import CacheStats
from services.cache.vectors import Entry, VectorIndex
from services.common.embeddings import Embedder
from services.common.errors import (
    DependencyUnavailable,
    FieldViolation,
    RequestInvalid,
    StrataError,
)
from services.common.redis_state import RedisOutage, queue_script, redis_errors, run_pipeline
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2

log = logging.getLogger(__name__)

POINT_NAMESPACE = uuid.UUID("6b7e6f2a-2f6e-4d58-9a77-5b6c0f4a1c10")
VECTOR_MEMO = 10_000
MAX_BATCH = 1000
_Meaning = tuple[int, str]
"""A stored answer's question for reuse by meaning: its turn, and its text normalised."""
SEMANTIC_FAULTS = (TimeoutError, OSError, RuntimeError, ValueError, StrataError)
"""What a failing or slow vector index or embedder raises: the semantic layer is skipped."""


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """The cache's tunables (from the service settings)."""

    default_ttl_s: int
    max_ttl_s: int
    semantic_enabled: bool
    min_similarity: float
    max_semantic_temperature: float
    candidates: int
    semantic_timeout_s: float
    max_entries_per_tenant: int
    max_bytes_per_tenant: int
    audit_min_similarity: float
    max_semantic_chars: int = 2000


def point_id(tenant_id: str, digest: str) -> str:
    """The vector index id of an entry (stable, so a new store replaces the old point)."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{tenant_id}/{digest}"))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """Cosine similarity of two vectors."""
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


_STORE = """
-- KEYS: the answer, the tenant's entries (zset: digest -> stored at), its sizes (hash:
-- digest -> bytes, and total). ARGV: the answer's bytes, ttl seconds, digest, now.
-- Stores the answer and keeps the tenant's count and byte total; returns {count, total}
-- so the caller checks the caps without another round trip.
local previous = tonumber(redis.call('HGET', KEYS[3], ARGV[3]) or '0')
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
redis.call('HSET', KEYS[3], ARGV[3], #ARGV[1])
local total = redis.call('HINCRBY', KEYS[3], 'total', #ARGV[1] - previous)
return {redis.call('ZCARD', KEYS[2]), total}
"""


class AnswerCache:
    """Finds, stores, audits and drops answers."""

    def __init__(
        self,
        client: redis.Redis,
        index: VectorIndex,
        embedder: Embedder,
        stats: CacheStats,
        policy: CachePolicy,
    ) -> None:
        self._redis = client
        self._index = index
        self._embedder = embedder
        self._stats = stats
        self._policy = policy
        self._vectors: OrderedDict[str, list[float]] = OrderedDict()
        self._embedding: dict[str, asyncio.Future[list[float]]] = {}
        """Embeddings under way, by text."""
        self._outage = RedisOutage("cache")
        self._store_script = client.register_script(_STORE)

    @contextmanager
    def _answers(self) -> Iterator[None]:
        """A read or write of answers in Redis: REDIS_UNAVAILABLE at once while Redis keeps
        failing, else within the Redis timeout. The orchestrator takes a failed lookup as a
        miss (cache status ERROR) and logs a failed store; the client never sees either."""
        if self._outage.active:
            raise DependencyUnavailable("redis")
        try:
            with redis_errors():
                yield
        except DependencyUnavailable:
            self._outage.failed()
            raise
        self._outage.answered()

    # --- lookup ----------------------------------------------------------------------

    async def lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        """The stored answer for the request, by exact match or by meaning, if any."""
        scope, messages = request.scope, request.messages
        check_scope(scope, messages)
        tenant = scope.tenant_id
        digest = entry_id(scope, messages)
        with self._answers():
            stored = await self._redis.get(redis_key(tenant, digest))
        if isinstance(stored, bytes):
            self._stats.count(tenant, "exact_hits")
            return cache_pb2.LookupResponse(
                match=common_pb2.CACHE_MATCH_EXACT,
                answer=cache_pb2.CachedAnswer.FromString(stored),
                entry_id=digest,
                exact_key=digest,
            )
        turn = self._meaning_turn(messages)
        if turn is None or not self._semantic_applies(scope):
            self._stats.count(tenant, "misses")
            return cache_pb2.LookupResponse(exact_key=digest)
        try:
            async with asyncio.timeout(self._policy.semantic_timeout_s):
                found = await self._semantic(scope, messages, turn)
        except SEMANTIC_FAULTS as err:
            # Qdrant (server or embedded) or the embedder failing or slow: a miss, never an
            # error, and never slower than the bound.
            log.warning("semantic lookup failed (%s); counting a miss", _fault(err))
            self._stats.count(tenant, "semantic_failures")
            found = cache_pb2.LookupResponse()
        self._stats.count(
            tenant,
            "semantic_hits" if found.match == common_pb2.CACHE_MATCH_SEMANTIC else "misses",
        )
        found.exact_key = digest
        return found

    def _semantic_applies(self, scope: cache_pb2.CacheScope) -> bool:
        if not self._policy.semantic_enabled or scope.semantic.disabled:
            return False
        return (
            scope.semantic.allow_high_temperature
            or temperature_of(scope.params) <= self._policy.max_semantic_temperature
        )

    async def _semantic(
        self,
        scope: cache_pb2.CacheScope,
        messages: Sequence[common_pb2.ChatMessage],
        turn: int,
    ) -> cache_pb2.LookupResponse:
        query = guards.normalize(messages[turn].content)
        vector = await self._vector(query)
        matches = await self._index.search(
            vector, semantic_scope(scope, messages, turn), time.time(), self._policy.candidates
        )
        threshold = scope.semantic.min_similarity or self._policy.min_similarity
        rejected_by = ""
        for match in matches:
            if match.score < threshold:
                break
            rejection = guards.check(query, match.query)
            if rejection is not None:
                self._stats.count(scope.tenant_id, f"guard:{rejection.guard}")
                rejected_by = rejected_by or rejection.guard
                continue
            with self._answers():
                stored = await self._redis.get(redis_key(scope.tenant_id, match.digest))
            if isinstance(stored, bytes):
                return cache_pb2.LookupResponse(
                    match=common_pb2.CACHE_MATCH_SEMANTIC,
                    answer=cache_pb2.CachedAnswer.FromString(stored),
                    similarity=match.score,
                    entry_id=match.digest,
                )
        return cache_pb2.LookupResponse(rejected_by=rejected_by)

    async def _vector(self, text: str) -> list[float]:
        """The embedding of a text; recent ones are remembered (a lookup then a store).

        One embedding per text at a time, and it runs to its end even when the lookup that
        asked gives up (its semantic timeout): that request goes on to the model, and the
        store of the model's answer needs the same vector, so it is never wasted, and under
        load a question is embedded once rather than once per attempt."""
        vector = self._vectors.get(text)
        if vector is not None:
            self._vectors.move_to_end(text)
            return vector
        embedding = self._embedding.get(text)
        if embedding is None:
            embedding = asyncio.ensure_future(self._embed(text))
            self._embedding[text] = embedding
            embedding.add_done_callback(lambda done: self._embedded(text, done))
        return await asyncio.shield(embedding)

    async def _embed(self, text: str) -> list[float]:
        [vector] = await self._embedder.embed([text])
        self._remember(text, vector)
        return vector

    def _embedded(self, text: str, done: asyncio.Future[list[float]]) -> None:
        del self._embedding[text]
        if not done.cancelled():
            done.exception()  # (retrieved: nobody may be waiting any more)

    def _remember(self, text: str, vector: list[float]) -> None:
        self._vectors[text] = vector
        if len(self._vectors) > VECTOR_MEMO:
            self._vectors.popitem(last=False)

    # --- store -----------------------------------------------------------------------

    async def store(self, request: cache_pb2.StoreRequest) -> str:
        """Stores the answer (Redis and the vector index); returns the entry id."""
        check_store(request)
        return (await self._store_all([request], [self._meaning(request)]))[0]

    async def store_batch(self, requests: Sequence[cache_pb2.StoreRequest]) -> list[str]:
        """Stores many answers as `store` would: their questions are embedded in batches
        first, then all go to Redis in one round trip and to the vector index in one upsert."""
        if not 1 <= len(requests) <= MAX_BATCH:
            raise RequestInvalid.field("entries", f"1 to {MAX_BATCH} entries")
        for i, request in enumerate(requests):
            check_store(request, f"entries[{i}].")
        meanings = [self._meaning(request) for request in requests]
        queries = [meaning[1] for meaning in meanings if meaning is not None]
        missing = [q for q in dict.fromkeys(queries) if q not in self._vectors]
        if missing:
            for query, vector in zip(missing, await self._embedder.embed(missing), strict=True):
                self._remember(query, vector)
        return await self._store_all(requests, meanings)

    async def _store_all(
        self, requests: Sequence[cache_pb2.StoreRequest], meanings: Sequence[_Meaning | None]
    ) -> list[str]:
        """Stores each answer; `meanings`: each one's `_meaning`."""
        now = time.time()
        bodies, digests, ttls = [], [], []
        for request in requests:
            ttl_s = self._policy.default_ttl_s
            if request.HasField("ttl"):
                ttl_s = request.ttl.ToSeconds()  # at least one (checked)
            ttls.append(min(ttl_s, self._policy.max_ttl_s))
            answer = cache_pb2.CachedAnswer()
            answer.CopyFrom(request.answer)
            answer.create_time.GetCurrentTime()
            bodies.append(answer.SerializeToString())
            digests.append(entry_id(request.scope, request.messages))

        def build(pipe: Any) -> None:
            for request, body, digest, ttl_s in zip(requests, bodies, digests, ttls, strict=True):
                tenant = request.scope.tenant_id
                queue_script(
                    pipe,
                    self._store_script,
                    [redis_key(tenant, digest), _entries_key(tenant), _sizes_key(tenant)],
                    [body, math.ceil(ttl_s), digest, now],
                )

        with self._answers():
            held: list[Any] = await run_pipeline(self._redis, build, [self._store_script])
        over: set[str] = set()
        caps = (self._policy.max_entries_per_tenant, self._policy.max_bytes_per_tenant)
        for request, (count, total) in zip(requests, held, strict=True):
            tenant = request.scope.tenant_id
            self._stats.count(tenant, "stores")
            if int(count) > caps[0] or int(total) > caps[1]:
                over.add(tenant)
        await self._index_all(requests, meanings, digests, ttls, now)
        for tenant in over:
            await self._enforce_caps(tenant)
        return digests

    async def _index_all(
        self,
        requests: Sequence[cache_pb2.StoreRequest],
        meanings: Sequence[_Meaning | None],
        digests: Sequence[str],
        ttls: Sequence[float],
        now: float,
    ) -> None:
        """Indexes by meaning, in one upsert, each stored answer that is reused so."""
        indexed = [
            (request, meaning, digest, ttl_s)
            for request, meaning, digest, ttl_s in zip(
                requests, meanings, digests, ttls, strict=True
            )
            if meaning is not None
        ]
        if not indexed:
            return
        try:
            async with asyncio.timeout(self._policy.semantic_timeout_s):
                entries = []
                for request, (turn, query), digest, ttl_s in indexed:
                    scope, messages = request.scope, request.messages
                    entries.append(
                        Entry(
                            id=point_id(scope.tenant_id, digest),
                            vector=await self._vector(query),
                            scope=semantic_scope(scope, messages, turn),
                            tenant=scope.tenant_id,
                            model=scope.model,
                            digest=digest,
                            query=query,
                            created_at=now,
                            expires_at=now + ttl_s,
                            doc_ids=tuple(sorted({d.id for d in scope.documents})),
                        )
                    )
                # An answer stored twice in the batch is one point: the later one.
                await self._index.upsert(list({e.id: e for e in entries}.values()))
        except SEMANTIC_FAULTS as err:
            log.warning("vector index store failed (%s); exact reuse only", _fault(err))
            for request, *_ in indexed:
                self._stats.count(request.scope.tenant_id, "semantic_failures")

    def _meaning(self, request: cache_pb2.StoreRequest) -> _Meaning | None:
        """The turn whose meaning indexes the answer, and that turn normalised; None when
        the answer is kept for exact reuse only. An answer made with reuse by meaning
        turned off is embedded nowhere (an exact-only route pays for no model)."""
        if not self._policy.semantic_enabled or request.scope.semantic.disabled:
            return None
        turn = self._meaning_turn(request.messages)
        if turn is None:
            return None
        return turn, guards.normalize(request.messages[turn].content)

    def _meaning_turn(self, messages: Sequence[common_pb2.ChatMessage]) -> int | None:
        """The last user turn, unless it is too long to be reused by meaning."""
        turn = last_user_turn(messages)
        if turn is None or len(messages[turn].content) > self._policy.max_semantic_chars:
            return None
        return turn

    async def _enforce_caps(self, tenant: str) -> None:
        """Evicts the tenant's oldest entries while it is over its entry or byte cap."""
        entries, sizes = _entries_key(tenant), _sizes_key(tenant)
        while True:
            with redis_errors():
                count = await self._redis.zcard(entries)
                total = int(await self._redis.hget(sizes, "total") or 0)
            over = count - self._policy.max_entries_per_tenant
            if over <= 0 and total <= self._policy.max_bytes_per_tenant:
                return
            with redis_errors():
                oldest: Any = await self._redis.zrange(entries, 0, max(over, 1) - 1)
            if not oldest:
                return
            await self._drop(tenant, [d.decode() for d in oldest])

    async def _drop(self, tenant: str, digests: Sequence[str]) -> int:
        """Removes entries from Redis and the vector index; returns how many were held."""
        if not digests:
            return 0
        entries, sizes = _entries_key(tenant), _sizes_key(tenant)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hmget(sizes, list(digests))
            pipe.zrem(entries, *digests)
            pipe.hdel(sizes, *digests)
            pipe.delete(*(redis_key(tenant, d) for d in digests))
            with redis_errors():
                replies: Any = await pipe.execute()
        freed = sum(int(size or 0) for size in replies[0])
        with redis_errors():
            await self._redis.hincrby(sizes, "total", -freed)
        try:
            await self._index.delete(ids=[point_id(tenant, d) for d in digests])
        except SEMANTIC_FAULTS as err:
            log.warning("vector index delete failed (%s); the points expire instead", _fault(err))
        return int(replies[1])

    # --- invalidation, audit, stats --------------------------------------------------

    async def invalidate(self, request: cache_pb2.InvalidateRequest) -> int:
        """Drops every entry of the tenant matching all the given conditions."""
        tenant = request.tenant_id
        violations = []
        if not tenant:
            violations.append(FieldViolation("tenant_id", "is required"))
        conditions = (
            request.model or request.document_id or request.HasField("older_than") or request.all
        )
        if not conditions:
            violations.append(FieldViolation("all", "give a condition, or all to drop everything"))
        if violations:
            raise RequestInvalid(violations)
        older_than = request.older_than.ToSeconds() if request.HasField("older_than") else None
        if request.model or request.document_id:
            digests = await self._index.delete(
                tenant=tenant,
                model=request.model or None,
                doc_id=request.document_id or None,
                older_than=older_than,
            )
        else:
            cutoff = f"({older_than}" if older_than is not None else "+inf"
            with redis_errors():
                held: Any = await self._redis.zrangebyscore(_entries_key(tenant), "-inf", cutoff)
            digests = [d.decode() for d in held]
        return await self._drop(tenant, digests)

    async def audit(self, request: cache_pb2.AuditRequest) -> tuple[bool, float]:
        """Whether a fresh answer agrees with the stored one; counted in the stats."""
        violations = [
            FieldViolation(name, "is required")
            for name in ("tenant_id", "entry_id")
            if not getattr(request, name)
        ]
        if violations:
            raise RequestInvalid(violations)
        with redis_errors():
            stored = await self._redis.get(redis_key(request.tenant_id, request.entry_id))
        if not isinstance(stored, bytes):
            raise RequestInvalid.field("entry_id", "no such entry (or it expired)")
        previous = cache_pb2.CachedAnswer.FromString(stored)
        old, new = await self._embedder.embed([previous.text, request.answer_text])
        similarity = cosine(old, new)
        agreed = similarity >= self._policy.audit_min_similarity
        self._stats.count(request.tenant_id, "audits")
        if not agreed:
            self._stats.count(request.tenant_id, "audit_disagreements")
        return agreed, similarity

    async def stats(self, tenant_id: str) -> cache_pb2.GetStatsResponse:
        """The tenant's counters and the entries it holds."""
        if not tenant_id:
            raise RequestInvalid.field("tenant_id", "is required")
        await self._stats.flush()
        counters = await self._stats.read(tenant_id)
        with redis_errors():
            entries = await self._redis.zcard(_entries_key(tenant_id))
        return cache_pb2.GetStatsResponse(
            exact_hits=counters.get("exact_hits", 0),
            semantic_hits=counters.get("semantic_hits", 0),
            misses=counters.get("misses", 0),
            stores=counters.get("stores", 0),
            entries=entries,
            guard_rejections={
                name.removeprefix("guard:"): value
                for name, value in counters.items()
                if name.startswith("guard:")
            },
            audits=counters.get("audits", 0),
            audit_disagreements=counters.get("audit_disagreements", 0),
        )

    async def ping(self) -> None:
        """Raises unless Redis answers."""
        await self._redis.ping()


def _fault(err: BaseException) -> str:
    """A fault's name for the log (a StrataError by its reason; never a payload)."""
    if isinstance(err, StrataError):
        return err.reason
    return type(err).__name__


def _entries_key(tenant_id: str) -> str:
    return f"strata:cache:entries:{tenant_id}"


def _sizes_key(tenant_id: str) -> str:
    return f"strata:cache:sizes:{tenant_id}"
