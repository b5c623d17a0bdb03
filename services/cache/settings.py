"""Settings of the cache service (environment prefix STRATA_CACHE_)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class CacheSettings(ServiceSettings):
    """Exact reuse of answers."""

    model_config = SettingsConfigDict(env_prefix="STRATA_CACHE_")

    port: int = 50053
    """Port to listen on."""
    redis_url: str = Field(validation_alias=AliasChoices("STRATA_CACHE_REDIS_URL", "REDIS_URL"))
    """Required. Redis holding the cached answers (STRATA_CACHE_REDIS_URL or REDIS_URL)."""
    redis_timeout_s: float = 0.25
    """Longest a single Redis command may take before the call fails as unavailable."""
    default_ttl_s: int = 3600
    """Lifetime of a stored answer when the request does not set one."""
    max_ttl_s: int = 7 * 24 * 3600
    """Longest lifetime a request may ask for."""
