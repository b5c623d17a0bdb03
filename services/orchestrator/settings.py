"""Settings of the orchestrator (environment prefix STRATA_ORCHESTRATOR_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class OrchestratorSettings(ServiceSettings):
    """The public API and where it finds the other services."""

    model_config = SettingsConfigDict(env_prefix="STRATA_ORCHESTRATOR_")

    port: int = 50051
    """Port to listen on."""
    control_address: str
    """Required. host:port of the control service."""
    cache_address: str
    """Required. host:port of the cache service."""
    executor_address: str
    """Required. host:port of the executor service."""
    models_file: Path
    """Required. YAML file of providers and models (the same file the executor reads)."""
    guardrails_file: Path = Path(__file__).resolve().parents[2] / "config" / "guardrails.yaml"
    """YAML file of guardrail profiles, for the output checks (the same file control reads)."""
    cache_audit_rate: float = Field(default=0.0, ge=0, le=1)
    """Share of semantic cache hits also answered by the model in the background, to measure
    how often a hit was wrong (the cache counts agreements; these calls are not billed)."""
    default_deadline_s: float = 300.0
    """Longest a request may run when the client set no deadline."""
    admit_timeout_s: float = 2.0
    """Longest wait for the control service's admission."""
    cache_timeout_s: float = 0.5
    """Longest wait for a cache lookup or store; past it the request goes on as a miss."""
    settle_timeout_s: float = 2.0
    """Longest wait for one settlement attempt."""
