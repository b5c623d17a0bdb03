"""Settings of the control service (environment prefix STRATA_CONTROL_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ControlSettings(ServiceSettings):
    """API keys, limits and usage."""

    model_config = SettingsConfigDict(env_prefix="STRATA_CONTROL_")

    port: int = 50052
    """Port to listen on."""
    redis_url: str = Field(validation_alias=AliasChoices("STRATA_CONTROL_REDIS_URL", "REDIS_URL"))
    """Required. Redis holding limits, reservations and usage (STRATA_CONTROL_REDIS_URL or
    REDIS_URL)."""
    redis_timeout_s: float = 0.25
    """Longest a single Redis command may take before the call fails as unavailable."""
    tenants_file: Path
    """Required. YAML file of tenants and their API key hashes."""
    reservation_ttl_s: int = 900
    """How long a reservation lives without being settled."""
    settlement_ttl_s: int = 7 * 24 * 3600
    """How long a settlement is remembered, so a repeated Settle is not applied twice."""
