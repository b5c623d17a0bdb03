"""Settings of the executor service (environment prefix STRATA_EXECUTOR_)."""

from __future__ import annotations

from pathlib import Path

from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class ExecutorSettings(ServiceSettings):
    """Providers and models."""

    model_config = SettingsConfigDict(env_prefix="STRATA_EXECUTOR_")

    port: int = 50054
    """Port to listen on."""
    models_file: Path
    """Required. YAML file of providers and models (see services/common/catalog.py)."""
    default_deadline_s: float = 600.0
    """Longest a call may run when its caller set no deadline."""
