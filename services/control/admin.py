"""Administration: keys, budgets, limits, usage and breakers, for platform teams.

Mutations are idempotent by request id: the first answer is kept for a day under
`strata:admin:request:<id>` and returned to any repeat (a repeat arriving while the first is
still running waits for it). Every write goes where admission reads, so it applies to the
next request on every replica (key changes are announced to every replica's cache).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis.asyncio as redis
from google.protobuf import message as protobuf_message
from google.protobuf import timestamp_pb2

from services.common.admin import authorize, once
from services.common.catalog import Catalog
from services.common.errors import (
    FieldViolation,
    ModelNotFound,
    RequestInvalid,
)
from services.common.redis_state import redis_errors
from services.control.admission import TenantKeys, model_keys, periods
from services.control.keys import KeyStore, new_key, valid_id
from strata.common.v1 import common_pb2
from strata.control.v1 import admin_pb2

MAX_PAGE = 1000
_M = TypeVar("_M", bound=protobuf_message.Message)
_STATES = {
    "closed": admin_pb2.BREAKER_STATE_CLOSED,
    "open": admin_pb2.BREAKER_STATE_OPEN,
    "half_open": admin_pb2.BREAKER_STATE_HALF_OPEN,
}
_PERIODS = {
    admin_pb2.PERIOD_DAY: "day",
    admin_pb2.PERIOD_MONTH: "month",
    admin_pb2.PERIOD_TOTAL: "total",
}


def _page(items: list[str], page_size: int, page_token: str) -> tuple[list[str], str]:
    """A page of sorted names and the next token."""
    if page_size < 0:
        raise RequestInvalid.field("page_size", "must not be negative")
    size = min(page_size or 100, MAX_PAGE)
    start = 0
    if page_token:
        try:
            after = base64.urlsafe_b64decode(page_token.encode()).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            after = None
        if after is None or base64.urlsafe_b64encode(after.encode()).decode() != page_token:
            raise RequestInvalid.field("page_token", "is not a token this API gave")
        start = next((i for i, name in enumerate(items) if name > after), len(items))
    page = items[start : start + size]
    more = start + size < len(items)
    token = base64.urlsafe_b64encode(page[-1].encode()).decode() if more and page else ""
    return page, token


def _require(violations: list[FieldViolation]) -> None:
    if violations:
        raise RequestInvalid(violations)


class Admin:
    """The admin operations."""

    def __init__(
        self, client: redis.Redis, keys: KeyStore, catalog: Catalog, token: str | None
    ) -> None:
        self._redis = client
        self._keys = keys
        self._catalog = catalog
        self._token = token

    def authorize(self, presented: str) -> None:
        """Refuses unless `presented` is the admin token."""
        authorize(self._token, presented)

    async def idempotent(
        self, request_id: str, response: type[_M], apply: Callable[[], Awaitable[_M]]
    ) -> _M:
        """Applies a mutation once per request id; repeats get the first answer."""
        return await once(
            self._redis, "strata:admin:request", request_id, response, apply, kept=_without_key
        )

    # --- keys --------------------------------------------------------------------------

    async def create_key(
        self, request: admin_pb2.CreateApiKeyRequest
    ) -> admin_pb2.CreateApiKeyResponse:
        """A new key for a tenant (the key is returned this once)."""
        key_id = request.key_id or f"key-{int(time.time())}-{new_key()[1][:6]}"
        _require(
            [
                FieldViolation(name, "must match [a-z0-9][a-z0-9_-]{0,62}")
                for name, value in (
                    ("tenant_id", request.tenant_id),
                    ("key_id", key_id),
                    ("team_id", request.team_id or "team"),
                )
                if not valid_id(value)
            ]
        )
        names = TenantKeys(request.tenant_id)
        with redis_errors():
            # Claims the id atomically: of concurrent creates of one id, one wins.
            if not await self._redis.hsetnx(f"{names.base}:keys", key_id, "{}"):
                raise RequestInvalid.field("key_id", f"{key_id!r} exists in the tenant")
            stored: Any = await self._redis.hmget(names.policy, ["tenant:profile", "tenant:tier"])
        profile, tier = (value.decode() if value else "" for value in stored)
        key, digest = new_key()
        created = time.time()
        await self._keys.put(
            digest,
            request.tenant_id,
            key_id,
            request.team_id,
            profile,
            active=True,
            prefix=key[:14],
            created=created,
            tier=tier,
        )
        return admin_pb2.CreateApiKeyResponse(
            api_key=key,
            key=_key_proto(request.tenant_id, key_id, request.team_id, True, key[:14], created),
        )

    async def list_keys(
        self, request: admin_pb2.ListApiKeysRequest
    ) -> admin_pb2.ListApiKeysResponse:
        """A page of a tenant's keys."""
        _require([FieldViolation("tenant_id", "is required")] if not request.tenant_id else [])
        with redis_errors():
            raw: Any = await self._redis.hgetall(f"{TenantKeys(request.tenant_id).base}:keys")
        infos = {k.decode(): json.loads(v) for k, v in raw.items()}
        page, token = _page(sorted(infos), request.page_size, request.page_token)
        return admin_pb2.ListApiKeysResponse(
            keys=[
                _key_proto(
                    request.tenant_id,
                    key_id,
                    infos[key_id]["team"],
                    infos[key_id]["active"],
                    infos[key_id]["prefix"],
                    infos[key_id]["created"],
                )
                for key_id in page
            ],
            next_page_token=token,
        )

    async def revoke_key(
        self, request: admin_pb2.RevokeApiKeyRequest
    ) -> admin_pb2.RevokeApiKeyResponse:
        """Revokes a key on every replica."""
        _require(
            [
                FieldViolation(n, "is required")
                for n in ("tenant_id", "key_id")
                if not getattr(request, n)
            ]
        )
        with redis_errors():
            raw: Any = await self._redis.hget(
                f"{TenantKeys(request.tenant_id).base}:keys", request.key_id
            )
        if raw is None:
            raise RequestInvalid.field("key_id", "no such key in the tenant")
        info = json.loads(raw)
        await self._keys.put(
            info["sha256"],
            request.tenant_id,
            request.key_id,
            info["team"],
            "",
            active=False,
            prefix=info["prefix"],
            created=info["created"],
        )
        return admin_pb2.RevokeApiKeyResponse(
            key=_key_proto(
                request.tenant_id,
                request.key_id,
                info["team"],
                False,
                info["prefix"],
                info["created"],
            )
        )

    # --- budgets and limits ------------------------------------------------------------

    async def set_budget(self, request: admin_pb2.SetBudgetRequest) -> admin_pb2.SetBudgetResponse:
        """Sets or removes a budget."""
        holder = _holder(request.tenant_id, request.scope, request.scope_id)
        violations = []
        if request.period not in _PERIODS:
            violations.append(FieldViolation("period", "must be day, month or total"))
        if request.limit_usd_micros < 0:
            violations.append(FieldViolation("limit_usd_micros", "must not be negative"))
        _require(violations)
        field = f"{holder}:budget:{_PERIODS[request.period]}"
        with redis_errors():
            await self._redis.hset(
                TenantKeys(request.tenant_id).policy, field, request.limit_usd_micros
            )
        return admin_pb2.SetBudgetResponse(limit_usd_micros=request.limit_usd_micros)

    async def set_limits(self, request: admin_pb2.SetLimitsRequest) -> admin_pb2.SetLimitsResponse:
        """Sets the limits of a tenant, key or model."""
        violations = [
            FieldViolation(name, "must not be negative")
            for name in ("requests_per_minute", "tokens_per_minute", "max_concurrent")
            if getattr(request, name) < 0
        ]
        if request.max_concurrent and request.scope != admin_pb2.SCOPE_TENANT:
            violations.append(FieldViolation("max_concurrent", "applies to a tenant only"))
        _require(violations)
        if request.scope == admin_pb2.SCOPE_MODEL:
            if self._catalog.get(request.scope_id) is None:
                raise ModelNotFound(request.scope_id)
            policy = model_keys(request.scope_id)[1]
            fields = {"rpm": request.requests_per_minute, "tpm": request.tokens_per_minute}
        else:
            holder = _holder(request.tenant_id, request.scope, request.scope_id)
            if holder.startswith("team:"):
                raise RequestInvalid.field("scope", "limits apply to a tenant, key or model")
            policy = TenantKeys(request.tenant_id).policy
            fields = {
                f"{holder}:rpm": request.requests_per_minute,
                f"{holder}:tpm": request.tokens_per_minute,
            }
            if holder == "tenant":
                fields["tenant:concurrency"] = request.max_concurrent
        with redis_errors():
            await self._redis.hset(policy, mapping=fields)  # type: ignore[arg-type]
        return admin_pb2.SetLimitsResponse(
            requests_per_minute=request.requests_per_minute,
            tokens_per_minute=request.tokens_per_minute,
            max_concurrent=request.max_concurrent,
        )

    # --- reading -----------------------------------------------------------------------

    async def usage(self, request: admin_pb2.GetUsageRequest) -> admin_pb2.GetUsageResponse:
        """Usage and spend of a scope in the current period."""
        if request.period not in _PERIODS:
            raise RequestInvalid.field("period", "must be day, month or total")
        names = TenantKeys(request.tenant_id)
        day, month = periods()
        period = {"day": f"d{day}", "month": f"m{month}", "total": "total"}[
            _PERIODS[request.period]
        ]
        prefix = ""
        if request.scope == admin_pb2.SCOPE_MODEL:
            _require([FieldViolation("tenant_id", "is required")] if not request.tenant_id else [])
            if self._catalog.get(request.scope_id) is None:
                raise ModelNotFound(request.scope_id)
            holder, prefix = "tenant", f"model:{request.scope_id}:"
        else:
            holder = _holder(request.tenant_id, request.scope, request.scope_id)
        with redis_errors():
            raw: Any = await self._redis.hgetall(names.usage(holder, period))
            reserved: Any = await self._redis.hget(names.reserved, holder)
            budget: Any = await self._redis.hget(
                names.policy, f"{holder}:budget:{_PERIODS[request.period]}"
            )
        counts = {k.decode(): int(v) for k, v in raw.items()}

        def count(name: str) -> int:
            return counts.get(prefix + name, 0)

        return admin_pb2.GetUsageResponse(
            requests=count("requests"),
            usage=common_pb2.Usage(
                input_tokens=count("input_tokens"), output_tokens=count("output_tokens")
            ),
            spent_usd_micros=count("spent"),
            reserved_usd_micros=0 if prefix else int(reserved or 0),
            budget_usd_micros=0 if prefix else int(budget or 0),
            cache_hits=count("cache_hits"),
        )

    async def breakers(
        self, request: admin_pb2.ListBreakersRequest
    ) -> admin_pb2.ListBreakersResponse:
        """A page of the models' breakers."""
        page, token = _page(sorted(self._catalog.models), request.page_size, request.page_token)
        async with self._redis.pipeline(transaction=False) as pipe:
            for model in page:
                pipe.hmget(model_keys(model)[0], "state", "consecutive", "open_until")
            with redis_errors():
                states: Any = await pipe.execute()
        breakers = []
        for model, (state, consecutive, open_until) in zip(page, states, strict=True):
            name = (state or b"closed").decode()
            until = int(float(open_until or 0))
            if name == "open" and until <= time.time() * 1_000_000:
                name = "half_open"  # the cool-down is over: the next request probes
            breaker = admin_pb2.Breaker(
                model=model,
                state=_STATES.get(name, admin_pb2.BREAKER_STATE_CLOSED),
                consecutive_failures=int(consecutive or 0),
            )
            if name == "open":
                breaker.open_until.FromMicroseconds(until)
            breakers.append(breaker)
        return admin_pb2.ListBreakersResponse(breakers=breakers, next_page_token=token)


def _without_key(response: _M) -> _M:
    """What is kept of an answer for repeats: never a clear API key."""
    if isinstance(response, admin_pb2.CreateApiKeyResponse):
        kept = admin_pb2.CreateApiKeyResponse()
        kept.CopyFrom(response)
        kept.api_key = ""
        return kept  # type: ignore[return-value]
    return response


def _holder(tenant_id: str, scope: int, scope_id: str) -> str:
    """The policy/usage holder name of a scope, checking the ids."""
    violations = []
    if not valid_id(tenant_id):
        violations.append(FieldViolation("tenant_id", "is required ([a-z0-9][a-z0-9_-]*)"))
    if scope == admin_pb2.SCOPE_TENANT:
        holder = "tenant"
    elif scope in (admin_pb2.SCOPE_TEAM, admin_pb2.SCOPE_KEY) and valid_id(scope_id):
        holder = ("team:" if scope == admin_pb2.SCOPE_TEAM else "key:") + scope_id
    elif scope in (admin_pb2.SCOPE_TEAM, admin_pb2.SCOPE_KEY):
        violations.append(FieldViolation("scope_id", "is required for team and key scopes"))
        holder = ""
    else:
        violations.append(FieldViolation("scope", "must be tenant, team or key"))
        holder = ""
    _require(violations)
    return holder


def _key_proto(
    tenant_id: str, key_id: str, team_id: str, active: bool, prefix: str, created: float
) -> admin_pb2.ApiKey:
    create_time = timestamp_pb2.Timestamp()
    create_time.FromMicroseconds(int(created * 1_000_000))
    return admin_pb2.ApiKey(
        tenant_id=tenant_id,
        key_id=key_id,
        team_id=team_id,
        state=admin_pb2.API_KEY_STATE_ACTIVE if active else admin_pb2.API_KEY_STATE_REVOKED,
        prefix=prefix,
        create_time=create_time,
    )
