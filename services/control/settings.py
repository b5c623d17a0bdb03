"""Settings of the control service (environment prefix STRATA_CONTROL_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ControlSettings(ServiceSettings):
    """API keys, limits, budgets, breakers and guardrails."""

    model_config = SettingsConfigDict(env_prefix="STRATA_CONTROL_")

    port: int = 50052
    """Port to listen on."""
    redis_url: str = Field(validation_alias=AliasChoices("STRATA_CONTROL_REDIS_URL", "REDIS_URL"))
    """Required. Redis holding keys, limits, reservations and usage (STRATA_CONTROL_REDIS_URL
    or REDIS_URL)."""
    redis_timeout_s: float = 0.25
    """Longest a single Redis command may take before the call fails as unavailable."""
    outage_grace_s: float = Field(default=900.0, ge=0)
    """While Redis does not answer, key records and tenant policies this process read from
    it at most this long ago stand in for it: requests without budgets are admitted by a
    per-process limiter (`strata.ratelimit.local_fallbacks`), requests with a budget are
    refused BUDGET_UNVERIFIABLE. Older or never read: refused (REDIS_UNAVAILABLE,
    BUDGET_UNVERIFIABLE). 0: every request is refused while Redis does not answer."""
    tenants_file: Path | None = None
    """YAML file of tenants, keys, limits and budgets written into Redis at start-up."""
    models_file: Path
    """Required. YAML file of providers and models (prices, fallbacks, breakers)."""
    guardrails_file: Path = Path(__file__).resolve().parents[2] / "config" / "guardrails.yaml"
    """YAML file of guardrail profiles (default: the profiles shipped in config/)."""
    reservation_ttl_s: int = 900
    """How long a reservation lives unsettled before it is charged in full."""
    settlement_ttl_s: int = 7 * 24 * 3600
    """How long a settlement is remembered, so a repeated Settle is not applied twice."""
    sweep_interval_s: float = 5.0
    """How often expired reservations are looked for and charged."""
    admin_token: SecretStr | None = None
    """Bearer token of the admin API (ControlAdminService); unset: the admin API refuses."""
