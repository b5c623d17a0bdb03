"""Exact reuse: an answer is found again only for the same scope and the same conversation.

The key is a SHA-256 over a canonical JSON form of the scope (model and generation
parameters, with unset kept apart from zero) and the conversation; the tenant is part of the
key's name, so no hash collision or bug in the canonical form can cross tenants.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import redis.asyncio as redis

from services.common.errors import FieldViolation, RequestInvalid
from services.common.redis_state import redis_errors
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2

FORMAT_VERSION = 1
"""Bumped whenever the canonical form changes, so old entries are never misread."""


def _optional(message: common_pb2.GenerationParams, field: str) -> object:
    return getattr(message, field) if message.HasField(field) else None


def canonical_form(
    scope: cache_pb2.CacheScope, messages: Sequence[common_pb2.ChatMessage]
) -> bytes:
    """The bytes whose hash identifies (model, parameters, conversation)."""
    params = scope.params
    fmt = params.response_format
    document = {
        "v": FORMAT_VERSION,
        "model": scope.model,
        "params": {
            "temperature": _optional(params, "temperature"),
            "top_p": _optional(params, "top_p"),
            "max_output_tokens": _optional(params, "max_output_tokens"),
            "stop": list(params.stop),
            "seed": _optional(params, "seed"),
            "tools": [[t.name, t.description, t.parameters_json] for t in params.tools],
            "tool_choice": [params.tool_choice.mode, params.tool_choice.function_name],
            "response_format": [fmt.type, fmt.schema_name, fmt.json_schema, fmt.strict],
        },
        "messages": [
            [
                m.role,
                m.name,
                m.tool_call_id,
                m.content,
                [[c.id, c.name, c.arguments_json] for c in m.tool_calls],
            ]
            for m in messages
        ],
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def entry_id(scope: cache_pb2.CacheScope, messages: Sequence[common_pb2.ChatMessage]) -> str:
    """The hex digest naming an entry inside its tenant."""
    return hashlib.sha256(canonical_form(scope, messages)).hexdigest()


def redis_key(tenant_id: str, digest: str) -> str:
    """Where an entry lives."""
    return f"strata:cache:exact:{tenant_id}:{digest}"


def _check_scope(scope: cache_pb2.CacheScope, messages: Sequence[object]) -> None:
    violations = []
    if not scope.tenant_id:
        violations.append(FieldViolation("scope.tenant_id", "is required"))
    if not scope.model:
        violations.append(FieldViolation("scope.model", "is required"))
    if not messages:
        violations.append(FieldViolation("messages", "at least one message is required"))
    if violations:
        raise RequestInvalid(violations)


class ExactCache:
    """Stores and finds answers by exact scope and conversation."""

    def __init__(self, client: redis.Redis, default_ttl_s: int, max_ttl_s: int) -> None:
        self._redis = client
        self._default_ttl_s = default_ttl_s
        self._max_ttl_s = max_ttl_s

    async def lookup(self, request: cache_pb2.LookupRequest) -> cache_pb2.LookupResponse:
        """The stored answer for the request's scope and conversation, if any."""
        _check_scope(request.scope, request.messages)
        key = redis_key(request.scope.tenant_id, entry_id(request.scope, request.messages))
        with redis_errors():
            stored = await self._redis.get(key)
        if not isinstance(stored, bytes):
            return cache_pb2.LookupResponse()
        return cache_pb2.LookupResponse(
            match=common_pb2.CACHE_MATCH_EXACT, answer=cache_pb2.CachedAnswer.FromString(stored)
        )

    async def store(self, request: cache_pb2.StoreRequest) -> str:
        """Stores the answer; returns the entry id."""
        _check_scope(request.scope, request.messages)
        ttl_s = self._default_ttl_s
        if request.HasField("ttl"):
            ttl_s = request.ttl.ToSeconds()
            if ttl_s <= 0:
                raise RequestInvalid.field("ttl", "must be at least one second")
        ttl_s = min(ttl_s, self._max_ttl_s)
        answer = cache_pb2.CachedAnswer()
        answer.CopyFrom(request.answer)
        answer.create_time.GetCurrentTime()
        digest = entry_id(request.scope, request.messages)
        with redis_errors():
            await self._redis.set(
                redis_key(request.scope.tenant_id, digest), answer.SerializeToString(), ex=ttl_s
            )
        return digest

    async def ping(self) -> None:
        """Raises unless Redis answers."""
        await self._redis.ping()
