"""What decides whether an answer may be reused: the scope digests of a request.

- The exact digest covers everything: model, every generation parameter (unset kept apart
  from zero), the retrieved documents with their versions, and the whole conversation with
  its text normalised (Unicode NFKC, invisible characters removed, whitespace collapsed).
- The semantic scope covers everything but the last user turn: model, the parameters that
  change answers (temperature in steps of 0.1), the system prompt, the conversation before
  the last user turn, and the documents. A semantic hit is only possible inside one scope;
  the last user turn is what is compared by meaning (and by the guards).

The tenant is part of every Redis key and every vector filter, never only of a digest, so
no collision or bug in a canonical form can cross tenants.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from services.cache.guards import normalize
from services.common.errors import FieldViolation, RequestInvalid
from services.common.validation import (
    MAX_MESSAGES,
    TENANT_ID,
    check_name,
    is_duration_at_least,
    is_finite_between,
)
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2

FORMAT_VERSION = 1
"""Bumped whenever a canonical form changes, so old entries are never misread."""
DEFAULT_TEMPERATURE = 1.0
"""The temperature assumed when a request leaves it unset (the common provider default)."""


def _optional(message: common_pb2.GenerationParams, field: str) -> object:
    return getattr(message, field) if message.HasField(field) else None


def _params(params: common_pb2.GenerationParams, *, exact: bool) -> dict[str, object]:
    fmt = params.response_format
    temperature: object = _optional(params, "temperature")
    if not exact:
        temperature = round(params.temperature, 1) if params.HasField("temperature") else None
    return {
        "temperature": temperature,
        "top_p": _optional(params, "top_p"),
        "max_output_tokens": _optional(params, "max_output_tokens"),
        "stop": list(params.stop),
        "seed": _optional(params, "seed") if exact else None,
        "tools": [[t.name, t.description, t.parameters_json] for t in params.tools],
        "tool_choice": [params.tool_choice.mode, params.tool_choice.function_name],
        "response_format": [fmt.type, fmt.schema_name, fmt.json_schema, fmt.strict],
    }


def _message(m: common_pb2.ChatMessage) -> list[object]:
    return [
        m.role,
        m.name,
        m.tool_call_id,
        normalize(m.content),
        [[c.id, c.name, c.arguments_json] for c in m.tool_calls],
    ]


def _digest(document: dict[str, object]) -> str:
    encoded = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(encoded).hexdigest()


def canonical_form(
    scope: cache_pb2.CacheScope, messages: Sequence[common_pb2.ChatMessage]
) -> bytes:
    """The bytes whose hash identifies (model, parameters, documents, conversation)."""
    document = {
        "v": FORMAT_VERSION,
        "model": scope.model,
        "params": _params(scope.params, exact=True),
        "documents": sorted([d.id, d.version] for d in scope.documents),
        "messages": [_message(m) for m in messages],
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def entry_id(scope: cache_pb2.CacheScope, messages: Sequence[common_pb2.ChatMessage]) -> str:
    """The hex digest naming an entry inside its tenant."""
    return hashlib.sha256(canonical_form(scope, messages)).hexdigest()


def last_user_turn(messages: Sequence[common_pb2.ChatMessage]) -> int | None:
    """Index of the last user message, or None when there is none."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].role == common_pb2.ROLE_USER:
            return index
    return None


def semantic_scope(
    scope: cache_pb2.CacheScope, messages: Sequence[common_pb2.ChatMessage], turn: int
) -> str:
    """The digest of everything a semantic match must share (all but the last user turn)."""
    return _digest(
        {
            "v": FORMAT_VERSION,
            "tenant": scope.tenant_id,
            "model": scope.model,
            "params": _params(scope.params, exact=False),
            "documents": sorted([d.id, d.version] for d in scope.documents),
            "before": [_message(m) for m in messages[:turn]],
            "after": [_message(m) for m in messages[turn + 1 :]],
        }
    )


def temperature_of(params: common_pb2.GenerationParams) -> float:
    """The sampling temperature in effect (the common default when unset)."""
    return params.temperature if params.HasField("temperature") else DEFAULT_TEMPERATURE


def redis_key(tenant_id: str, digest: str) -> str:
    """Where an entry's answer lives."""
    return f"strata:cache:exact:{tenant_id}:{digest}"


def check_scope(scope: cache_pb2.CacheScope, messages: Sequence[common_pb2.ChatMessage]) -> None:
    """INVALID_ARGUMENT unless the scope names a tenant and a model and there are messages
    (at most MAX_MESSAGES of known roles, names and parameters within bounds)."""
    violations = _scope_violations(scope, messages)
    if violations:
        raise RequestInvalid(violations)


def check_store(request: cache_pb2.StoreRequest, prefix: str = "") -> None:
    """`check_scope`, and a TTL (when given) of at least one second and an answer with a
    known finish reason; `prefix` names the entry inside a batch (`entries[3].`)."""
    violations = _scope_violations(request.scope, request.messages)
    if request.HasField("ttl") and not is_duration_at_least(request.ttl, 1_000_000_000):
        violations.append(FieldViolation("ttl", "must be at least one second"))
    if request.answer.finish_reason not in common_pb2.FinishReason.values():
        violations.append(FieldViolation("answer.finish_reason", "must be a known reason"))
    if violations:
        raise RequestInvalid([FieldViolation(prefix + v.field, v.description) for v in violations])


def _scope_violations(
    scope: cache_pb2.CacheScope, messages: Sequence[common_pb2.ChatMessage]
) -> list[FieldViolation]:
    violations = []
    if not scope.tenant_id:
        violations.append(FieldViolation("scope.tenant_id", "is required"))
    elif not TENANT_ID.fullmatch(scope.tenant_id):
        violations.append(FieldViolation("scope.tenant_id", "must match [a-z0-9][a-z0-9_-]*"))
    if violation := check_name(scope.model, "scope.model"):
        violations.append(violation)
    if not messages:
        violations.append(FieldViolation("messages", "at least one message is required"))
    elif len(messages) > MAX_MESSAGES:
        violations.append(FieldViolation("messages", f"at most {MAX_MESSAGES} messages"))
    elif any(m.role not in common_pb2.Role.values() for m in messages):
        violations.append(FieldViolation("messages", "roles must be known"))
    if not is_finite_between(scope.semantic.min_similarity, 0, 1):
        violations.append(FieldViolation("scope.semantic.min_similarity", "must be 0 to 1"))
    params = scope.params
    for name, high in (("temperature", 2.0), ("top_p", 1.0)):
        if params.HasField(name) and not is_finite_between(getattr(params, name), 0, high):
            violations.append(FieldViolation(f"scope.params.{name}", f"must be 0 to {high:g}"))
    for i, document in enumerate(scope.documents):
        if violation := check_name(document.id, f"scope.documents[{i}].id"):
            violations.append(violation)
    return violations
