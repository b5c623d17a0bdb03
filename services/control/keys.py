"""API keys and tenants, from a YAML file that stores only the keys' SHA-256 hashes.

    tenants:
      acme:
        keys:
          - id: acme-prod
            sha256: 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
            requests_per_minute: 600
            tokens_per_minute: 200000

A key is `sk-strata-` and 43 characters of random URL-safe base64 (256 bits). Keys that
random need no slow hash: SHA-256 of the key finds its record in one dictionary lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.errors import ApiKeyInvalid
from services.common.settings import ConfigError

KEY_PREFIX = "sk-strata-"
_ID = r"^[a-z0-9][a-z0-9_-]{0,62}$"


class KeyConfig(BaseModel):
    """One API key of a tenant."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=_ID)
    """Stable name of the key, shown in usage and logs instead of the key."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """Hex SHA-256 of the key."""
    requests_per_minute: int = Field(default=0, ge=0)
    """Requests the key may start per minute; 0 means no limit."""
    tokens_per_minute: int = Field(default=0, ge=0)
    """Prompt plus output tokens the key may reserve per minute; 0 means no limit."""
    disabled: bool = False
    """A disabled key is refused like an unknown one."""


class TenantConfig(BaseModel):
    """A tenant and its keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    """Display name."""
    keys: list[KeyConfig] = Field(default_factory=list)


class TenantsFile(BaseModel):
    """The whole tenants file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tenants: dict[str, TenantConfig]


class ApiKey(BaseModel):
    """A key as the control service uses it: its tenant and limits."""

    model_config = ConfigDict(frozen=True)

    tenant_id: str
    key_id: str
    requests_per_minute: int
    tokens_per_minute: int


def hash_key(key: str) -> str:
    """Hex SHA-256 of a key, as stored in the tenants file."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh key and its hash."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, hash_key(key)


class KeyRing:
    """Finds the key record for a presented key."""

    def __init__(self, tenants: TenantsFile) -> None:
        self._by_hash: dict[str, ApiKey] = {}
        self._by_id: dict[tuple[str, str], ApiKey] = {}
        hashes: set[str] = set()
        for tenant_id, tenant in tenants.tenants.items():
            if not _valid_id(tenant_id):
                raise ValueError(f"tenant id {tenant_id!r} must match {_ID}")
            for key in tenant.keys:
                if (tenant_id, key.id) in self._by_id:
                    raise ValueError(f"tenant {tenant_id!r} has two keys with id {key.id!r}")
                if key.sha256 in hashes:
                    raise ValueError(f"key {tenant_id}/{key.id} repeats another key's hash")
                hashes.add(key.sha256)
                record = ApiKey(
                    tenant_id=tenant_id,
                    key_id=key.id,
                    requests_per_minute=key.requests_per_minute,
                    tokens_per_minute=key.tokens_per_minute,
                )
                self._by_id[(tenant_id, key.id)] = record
                if not key.disabled:
                    self._by_hash[key.sha256] = record

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        """Reads a tenants file; raises ConfigError naming the file when it is invalid."""
        try:
            raw = yaml.safe_load(path.read_text())
            return cls(TenantsFile.model_validate(raw))
        except (OSError, yaml.YAMLError, ValidationError, ValueError) as err:
            raise ConfigError(f"invalid tenants file {path}: {err}") from err

    def get(self, tenant_id: str, key_id: str) -> ApiKey | None:
        """The record of a key by its ids (disabled keys included), or None."""
        return self._by_id.get((tenant_id, key_id))

    def authenticate(self, presented: str) -> ApiKey:
        """The record of a presented key; ApiKeyInvalid when unknown, disabled or malformed."""
        if not presented.startswith(KEY_PREFIX):
            raise ApiKeyInvalid("API key is missing or malformed")
        record = self._by_hash.get(hash_key(presented))
        if record is None:
            raise ApiKeyInvalid("API key is not valid")
        return record


def _valid_id(value: str) -> bool:
    return re.fullmatch(_ID, value) is not None
