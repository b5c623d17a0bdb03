"""API keys and tenants.

Keys live in Redis, stored only as their SHA-256: `strata:key:<sha256>` holds the key's
tenant, id, team, guardrail profile and state; `strata:{t:<tenant>}:keys` indexes a tenant's
keys by id. A key is `sk-strata-` and 43 characters of random URL-safe base64 (256 bits), so
a fast hash is safe and one lookup finds its record.

Each control process caches records briefly (10 s; 2 s for unknown keys) and drops a record
as soon as `strata:key-events` announces a change, so a revoked key is refused on every
replica within moments. The tenants file (YAML) seeds keys, limits and budgets at start-up:

    tenants:
      acme:
        limits: {requests_per_minute: 6000, tokens_per_minute: 2000000, max_concurrent: 64}
        budgets: {day_usd: "50", month_usd: "1000"}
        guardrail_profile: default
        teams:
          search: {budgets: {month_usd: "200"}}
        keys:
          - id: acme-prod
            sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
            team: search
            requests_per_minute: 600
            tokens_per_minute: 200000
            budgets: {day_usd: "5"}
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import redis.asyncio as redis
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.errors import ApiKeyInvalid, DependencyUnavailable
from services.common.redis_state import redis_errors
from services.common.settings import ConfigError
from services.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

KEY_PREFIX = "sk-strata-"
ID_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ID = re.compile(ID_PATTERN)
EVENTS_CHANNEL = "strata:key-events"
TENANTS_SET = "strata:tenants"
CACHE_S = 10.0
UNKNOWN_CACHE_S = 2.0


def hash_key(key: str) -> str:
    """Hex SHA-256 of a key, as stored."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its hash."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


def valid_id(value: str) -> bool:
    """Whether a tenant, team or key id is well formed."""
    return _ID.fullmatch(value) is not None


def tenant_tag(tenant_id: str) -> str:
    """The prefix of every Redis key of a tenant (one Redis Cluster hash slot)."""
    return f"strata:{{t:{tenant_id}}}"


def record_key(digest: str) -> str:
    """Where a key's record lives."""
    return f"strata:key:{digest}"


def micros(usd: Decimal | None) -> int:
    """USD as millionths of a USD."""
    return int(usd * 1_000_000) if usd is not None else 0


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as the control service uses it."""

    tenant_id: str
    key_id: str
    team_id: str
    profile: str
    active: bool
    tier: str = ""


# --- the tenants file -----------------------------------------------------------------


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BudgetsConfig(_Config):
    """Spending budgets in USD (at most 6 decimals); unset means none."""

    day_usd: Decimal | None = None
    month_usd: Decimal | None = None
    total_usd: Decimal | None = None

    @field_validator("day_usd", "month_usd", "total_usd")
    @classmethod
    def _positive_micros(cls, value: Decimal | None) -> Decimal | None:
        if value is not None and (value <= 0 or (value * 1_000_000) % 1 != 0):
            raise ValueError("must be > 0 with at most 6 decimals")
        return value

    def fields(self, holder: str) -> dict[str, int]:
        """Policy fields of these budgets for a holder ("tenant", "team:x", "key:y")."""
        periods = {"day": self.day_usd, "month": self.month_usd, "total": self.total_usd}
        return {f"{holder}:budget:{p}": micros(v) for p, v in periods.items() if v is not None}


class KeyConfig(_Config):
    """One API key of a tenant."""

    id: str = Field(pattern=ID_PATTERN)
    """Stable name of the key, shown in usage and logs instead of the key."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of the key."""
    team: str = Field(default="", pattern=r"^$|" + ID_PATTERN)
    """The team the key belongs to, if any."""
    requests_per_minute: int = Field(default=0, ge=0)
    """Requests the key may start per minute; 0 means no limit."""
    tokens_per_minute: int = Field(default=0, ge=0)
    """Prompt plus output tokens the key may reserve per minute; 0 means no limit."""
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    """The key's own budgets."""
    disabled: bool = False
    """A disabled key is refused like an unknown one."""


class LimitsConfig(_Config):
    """A tenant's limits across all its keys; 0 means none."""

    requests_per_minute: int = Field(default=0, ge=0)
    tokens_per_minute: int = Field(default=0, ge=0)
    max_concurrent: int = Field(default=0, ge=0)
    burst_s: float = Field(default=60.0, gt=0, le=60)
    """How many seconds of the per-minute rates the tenant and its keys may use at once."""


class TeamConfig(_Config):
    """A team of a tenant."""

    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)


class TenantConfig(_Config):
    """A tenant, its limits, budgets, teams and keys."""

    name: str = ""
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    budgets: BudgetsConfig = Field(default_factory=BudgetsConfig)
    guardrail_profile: str = ""
    tier: str = Field(default="", pattern=r"^[A-Za-z0-9_-]{0,32}$")
    """A label for routes' rules (e.g. free, pro)."""
    teams: dict[str, TeamConfig] = Field(default_factory=dict)
    keys: list[KeyConfig] = Field(default_factory=list)


class TenantsFile(_Config):
    """The whole tenants file."""

    tenants: dict[str, TenantConfig]

    @classmethod
    def load(cls, path: Path) -> TenantsFile:
        """Reads and checks a tenants file; ConfigError names the file when it is invalid."""
        try:
            parsed = cls.model_validate(yaml.safe_load(path.read_text()))
            parsed.check()
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError, ValueError) as err:
            raise ConfigError(f"invalid tenants file {path}: {err}") from err
        return parsed

    def check(self) -> None:
        """Ids well formed and unique, hashes not repeated, teams declared."""
        hashes: set[str] = set()
        for tenant_id, tenant in self.tenants.items():
            if not valid_id(tenant_id):
                raise ValueError(f"tenant id {tenant_id!r} must match {ID_PATTERN}")
            ids: set[str] = set()
            for team_id in tenant.teams:
                if not valid_id(team_id):
                    raise ValueError(f"team id {team_id!r} must match {ID_PATTERN}")
            for key in tenant.keys:
                if key.id in ids:
                    raise ValueError(f"tenant {tenant_id!r} has two keys with id {key.id!r}")
                if key.sha256 in hashes:
                    raise ValueError(f"key {tenant_id}/{key.id} repeats another key's hash")
                if key.team and key.team not in tenant.teams:
                    raise ValueError(f"key {tenant_id}/{key.id} names undeclared team {key.team}")
                ids.add(key.id)
                hashes.add(key.sha256)


# --- the store ---------------------------------------------------------------------------


def _key_info(digest: str, team: str, active: bool, prefix: str, created: float) -> str:
    return json.dumps(
        {"sha256": digest, "team": team, "active": active, "prefix": prefix, "created": created}
    )


def digest_of(presented: str) -> str:
    """The SHA-256 a presented key is kept under; ApiKeyInvalid when it is malformed."""
    if not presented.startswith(KEY_PREFIX):
        raise ApiKeyInvalid("API key is missing or malformed")
    return hash_key(presented)


def _valid(record: KeyRecord | None) -> KeyRecord:
    if record is None or not record.active:
        raise ApiKeyInvalid("API key is not valid")
    return record


class KeyStore:
    """Key records in Redis, cached per process and invalidated by pub/sub.

    Concurrent requests of a key not cached share one read (a burst of a new key on a fresh
    replica is one Redis call, not one per request). A read overtaken by a change of any key
    (announced, or written here) may hold the record from before the change, a revocation
    for instance: it serves the callers that came before the change, and is not cached;
    later callers read again."""

    def __init__(self, client: redis.Redis, default_profile: str) -> None:
        self._redis = client
        self._default_profile = default_profile
        self._cache: dict[str, tuple[KeyRecord | None, float]] = {}
        """digest -> (record, or None for an unknown key; when it was read, monotonic)."""
        self._fresh_since = 0.0
        """Records read before this are read again (announcements were lost meanwhile); they
        still serve `last_known` while Redis does not answer."""
        self._listener: asyncio.Task[None] | None = None
        self._reading: dict[str, tuple[asyncio.Future[KeyRecord | None], int]] = {}
        """Reads under way, by digest, with the changes seen when each began."""
        self._changes = 0
        """Changes seen so far (announced or written here)."""

    async def authenticate(self, presented: str) -> KeyRecord:
        """The record of a presented key; ApiKeyInvalid when unknown, revoked or malformed."""
        return await self.authenticate_hash(digest_of(presented))

    async def authenticate_hash(self, digest: str) -> KeyRecord:
        """The record of a key given by its SHA-256 (work queued earlier by that key)."""
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ApiKeyInvalid("API key hash is malformed")
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached is not None and self._fresh(cached, now):
            return _valid(cached[0])
        under_way = self._reading.get(digest)
        if under_way is not None and under_way[1] == self._changes:
            reading = under_way[0]
        else:  # none, or one that began before a change: it may hold the old record
            reading = asyncio.ensure_future(self._read(digest))
            self._reading[digest] = (reading, self._changes)
            reading.add_done_callback(functools.partial(self._read_done, digest))
        return _valid(await asyncio.shield(reading))

    async def _read(self, digest: str) -> KeyRecord | None:
        changes, began = self._changes, time.monotonic()
        record = await self._load(digest)
        if changes == self._changes:
            if len(self._cache) > 100_000:
                self._cache.clear()
            self._cache[digest] = (record, began)
        return record

    def _read_done(self, digest: str, reading: asyncio.Future[KeyRecord | None]) -> None:
        under_way = self._reading.get(digest)
        if under_way is not None and under_way[0] is reading:
            del self._reading[digest]
        if not reading.cancelled():
            reading.exception()  # its callers have it (or all of them were cancelled)

    def _changed(self, digest: str) -> None:
        self._changes += 1
        self._cache.pop(digest, None)

    def _fresh(self, cached: tuple[KeyRecord | None, float], now: float) -> bool:
        record, read_at = cached
        ttl = CACHE_S if record is not None else UNKNOWN_CACHE_S
        return read_at >= self._fresh_since and now - read_at < ttl

    def last_known(self, digest: str, max_age_s: float) -> KeyRecord:
        """The record this process last read for a key, if read within `max_age_s` (while
        Redis does not answer); DependencyUnavailable when there is none that recent."""
        cached = self._cache.get(digest)
        if cached is None or time.monotonic() - cached[1] > max_age_s:
            raise DependencyUnavailable("redis")
        return _valid(cached[0])

    def known(self, digest: str) -> bool:
        """Whether this process has read the key's record (known keys survive an outage)."""
        return digest in self._cache

    async def _load(self, digest: str) -> KeyRecord | None:
        with redis_errors():
            raw: Any = await self._redis.hgetall(record_key(digest))
        if not raw:
            return None
        fields = {k.decode(): v.decode() for k, v in raw.items()}
        return KeyRecord(
            tenant_id=fields["tenant"],
            key_id=fields["key_id"],
            team_id=fields.get("team", ""),
            profile=fields.get("profile") or self._default_profile,
            active=fields.get("state") == "active",
            tier=fields.get("tier", ""),
        )

    async def put(
        self,
        digest: str,
        tenant_id: str,
        key_id: str,
        team_id: str,
        profile: str,
        active: bool,
        prefix: str = "",
        created: float | None = None,
        tier: str = "",
    ) -> None:
        """Writes a key's record and index entry, and tells every replica."""
        created = time.time() if created is None else created
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                record_key(digest),
                mapping={
                    "tenant": tenant_id,
                    "key_id": key_id,
                    "team": team_id,
                    "profile": profile,
                    "tier": tier,
                    "state": "active" if active else "revoked",
                },
            )
            pipe.hset(
                f"{tenant_tag(tenant_id)}:keys",
                key_id,
                _key_info(digest, team_id, active, prefix, created),
            )
            pipe.sadd(TENANTS_SET, tenant_id)
            pipe.publish(EVENTS_CHANNEL, digest)
            with redis_errors():
                await pipe.execute()
        self._changed(digest)

    async def listen(self) -> None:
        """Drops cached records as changes are announced (runs until cancelled)."""
        while True:
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(EVENTS_CHANNEL)
                try:
                    async for message in pubsub.listen():
                        data = message.get("data")
                        if isinstance(data, bytes):
                            self._changed(data.decode())
                finally:
                    await pubsub.aclose()
            except (redis.RedisError, OSError) as err:
                # Without announcements the cache still expires within CACHE_S.
                log.warning("key change announcements lost (%s); retrying", err)
                self._fresh_since = time.monotonic()
                self._changes += 1
                await asyncio.sleep(1.0)

    def start(self) -> None:
        """Starts listening for key changes."""
        self._listener = asyncio.create_task(self.listen(), name="key-events")

    async def stop(self) -> None:
        """Stops listening."""
        if self._listener is not None:
            await cancel_and_wait(self._listener)


async def seed(client: redis.Redis, store: KeyStore, tenants: TenantsFile) -> None:
    """Writes the tenants file's keys, limits and budgets into Redis (idempotent)."""
    for tenant_id, tenant in tenants.tenants.items():
        policy: dict[str, int | str] = {
            "tenant:rpm": tenant.limits.requests_per_minute,
            "tenant:tpm": tenant.limits.tokens_per_minute,
            "tenant:concurrency": tenant.limits.max_concurrent,
            "tenant:burst_s": str(tenant.limits.burst_s),
            **tenant.budgets.fields("tenant"),
        }
        for team_id, team in tenant.teams.items():
            policy.update(team.budgets.fields(f"team:{team_id}"))
        for key in tenant.keys:
            policy[f"key:{key.id}:rpm"] = key.requests_per_minute
            policy[f"key:{key.id}:tpm"] = key.tokens_per_minute
            policy.update(key.budgets.fields(f"key:{key.id}"))
        with redis_errors():
            await client.hset(f"{tenant_tag(tenant_id)}:policy", mapping=policy)  # type: ignore[arg-type]
            if tenant.guardrail_profile:
                await client.hset(
                    f"{tenant_tag(tenant_id)}:policy", "tenant:profile", tenant.guardrail_profile
                )
            if tenant.tier:
                await client.hset(f"{tenant_tag(tenant_id)}:policy", "tenant:tier", tenant.tier)
        for key in tenant.keys:
            # A key revoked at run time stays revoked: the file cannot bring it back.
            with redis_errors():
                state = await client.hget(record_key(key.sha256), "state")
            await store.put(
                key.sha256,
                tenant_id,
                key.id,
                key.team,
                tenant.guardrail_profile,
                active=not key.disabled and state != b"revoked",
                tier=tenant.tier,
            )
