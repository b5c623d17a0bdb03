"""Settings of the cache service (environment prefix STRATA_CACHE_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class CacheSettings(ServiceSettings):
    """Exact and semantic reuse of answers."""

    model_config = SettingsConfigDict(env_prefix="STRATA_CACHE_")

    port: int = 50053
    """Port to listen on."""
    redis_url: str = Field(validation_alias=AliasChoices("STRATA_CACHE_REDIS_URL", "REDIS_URL"))
    """Required. Redis holding the answers (STRATA_CACHE_REDIS_URL or REDIS_URL)."""
    redis_timeout_s: float = 0.25
    """Longest a single Redis command may take before the call fails as unavailable."""
    default_ttl_s: int = 3600
    """Lifetime of a stored answer when the request does not set one."""
    max_ttl_s: int = 7 * 24 * 3600
    """Longest lifetime a request may ask for."""
    semantic_enabled: bool = True
    """Reuse answers by meaning (off: exact reuse only)."""
    min_similarity: float = Field(default=0.83, ge=0, le=1)
    """Least cosine similarity of two questions for a semantic hit, unless the request's
    route sets its own (see `bench/cache_quality.py` and `strata cache tune`)."""
    max_semantic_temperature: float = 1.0
    """No semantic reuse above this temperature (unset counts as 1.0) unless allowed."""
    max_semantic_chars: int = Field(default=2000, ge=0)
    """No semantic reuse of a question longer than this (exact reuse only): the embedder
    sees its first few hundred words only, and the guards' work grows with its length."""
    semantic_candidates: int = Field(default=5, ge=1, le=50)
    """How many nearest stored questions are checked by the guards."""
    semantic_timeout_s: float = Field(default=0.3, gt=0)
    """Longest the semantic layer (embedding and vector index) may take in a lookup or a
    store; past it, or when Qdrant fails, the lookup is a miss (logged and counted as
    `semantic_failures`) and a store keeps exact reuse only. Below the orchestrator's
    cache_timeout_s, so a slow index never costs the request its exact lookup."""
    embedder: Literal["local", "executor"] = "local"
    """`local`: all-MiniLM-L6-v2 on the CPU, offline; `executor`: a provider's embeddings
    through the executor's Embed RPC (set executor_address and embedding_model)."""
    embed_threads: int = Field(default=1, ge=1)
    """Threads of the local embedder."""
    executor_address: str | None = None
    """host:port of the executor, for the `executor` embedder."""
    embedding_model: str = ""
    """Embedding model alias at the executor, for the `executor` embedder."""
    embedding_dimensions: int = Field(default=384, ge=1)
    """Vector length of the `executor` embedder's model (the local one is 384)."""
    vector_backend: Literal["edge", "qdrant"] = "edge"
    """`edge`: Qdrant's engine in-process, on disk under data_dir; `qdrant`: a Qdrant server."""
    data_dir: Path = Path("data/cache")
    """Where the embedded vector index lives."""
    qdrant_url: str | None = Field(
        default=None, validation_alias=AliasChoices("STRATA_CACHE_QDRANT_URL", "QDRANT_URL")
    )
    """URL of the Qdrant server, for the `qdrant` backend (or QDRANT_URL); `:memory:` runs
    qdrant-client's local mode in-process (tests and demos: slow past a few thousand points)."""
    qdrant_api_key: SecretStr | None = None
    """API key of the Qdrant server."""
    max_entries_per_tenant: int = Field(default=100_000, ge=1)
    """Past this many entries a tenant's oldest are evicted."""
    max_bytes_per_tenant: int = Field(default=256 * 1024 * 1024, ge=1)
    """Past this many bytes of answers a tenant's oldest entries are evicted."""
    audit_min_similarity: float = Field(default=0.8, ge=0, le=1)
    """An audited fresh answer at least this similar to the stored one agrees with it."""
    admin_token: SecretStr | None = None
    """Bearer token of CacheAdminService; unset: the admin API refuses."""
