"""Settings of the orchestrator (environment prefix STRATA_ORCHESTRATOR_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
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
    redis_url: str = Field(
        validation_alias=AliasChoices("STRATA_ORCHESTRATOR_REDIS_URL", "REDIS_URL")
    )
    """Required. Redis holding idempotency keys, single flights and jobs (or REDIS_URL)."""
    redis_timeout_s: float = 0.25
    """Longest a single Redis command may take."""
    routes_file: Path | None = None
    """YAML file of routes (reloaded when it changes); unset: requests name models only."""
    templates_dir: Path | None = Path(__file__).resolve().parents[2] / "config" / "templates"
    """Directory of prompt template files (plus runtime versions in Redis)."""
    pipelines_file: Path | None = None
    """YAML file of pipelines; unset: no pipelines."""
    knowledge_enabled: bool = True
    """Serve KnowledgeService and retrieval (loads the embedding model)."""
    vector_backend: Literal["edge", "qdrant"] = "edge"
    """Knowledge collections: `edge` (Qdrant's engine in-process, under data_dir) or `qdrant`."""
    knowledge_chunk_tokens: int = Field(default=160, ge=16, le=2000)
    """Tokens per document chunk; the embedder reads at most 256 of its own tokens, which
    ~160 of the chunker's cover."""
    knowledge_overlap_tokens: int = Field(default=32, ge=0)
    """Tokens a chunk repeats from the one before it."""
    retrieval_timeout_s: float = Field(default=2.0, gt=0)
    """Longest a request's retrieval may take; past it, or when the knowledge index fails,
    the request's (else its route's) `on_failure` policy applies."""
    data_dir: Path = Path("data/orchestrator")
    """Where the embedded knowledge index lives."""
    qdrant_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("STRATA_ORCHESTRATOR_QDRANT_URL", "QDRANT_URL"),
    )
    """URL of the Qdrant server for the `qdrant` backend (or QDRANT_URL); `:memory:` runs
    qdrant-client's local mode."""
    cache_admin_token: SecretStr | None = None
    """The cache's admin token: updating a document drops the cached answers that used it."""
    role: Literal["all", "api", "worker"] = "all"
    """`all`: the API and job workers; `api`: the API only; `worker`: job workers only (the
    process serves just its health check)."""
    job_concurrency: int = Field(default=4, ge=1)
    """Jobs run at once by this process."""
    job_claim_idle_s: float = Field(default=30.0, gt=0)
    """A job whose worker has not been heard from for this long is taken over by another."""
    job_result_ttl_s: int = Field(default=86400, ge=1)
    """How long a finished job (and its result) is kept."""
    trace_record_ttl_s: int = Field(default=24 * 3600, ge=1)
    """How long request records (`strata trace`, TraceService) are kept."""
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
    after_reply_linger_s: float = Field(default=0.01, ge=0, le=1)
    """How long a settlement, a cache store or a request record, sent after the reply while
    none of its kind is on its way, waits for others to go with it in one call (0: it goes
    at once). Fewer, fuller calls cost control, the cache and Redis less CPU per request."""
