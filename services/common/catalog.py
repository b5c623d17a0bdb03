"""The model catalog: which aliases exist, who serves them, and what they cost.

One YAML file (`models.yaml`) is read by every service that needs it: the orchestrator
validates aliases and limits, the executor reaches the providers, control prices requests.

    providers:
      mock: {kind: mock}
      local: {kind: openai_compatible, base_url: "http://127.0.0.1:8000/v1"}
    models:
      mock-small:
        provider: mock
        upstream_model: echo
        input_usd_per_million_tokens: "0.15"
        output_usd_per_million_tokens: "0.60"
        max_output_tokens: 1024
        context_window: 16384
"""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from services.common.settings import ConfigError
from strata.common.v1 import common_pb2


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetryBudgetConfig(_Strict):
    """How many retries a provider may take, SRE-book style, so an outage is not multiplied."""

    ratio: float = Field(default=0.1, ge=0, le=1)
    """Retries may be at most this share of the requests in the window."""
    window_s: float = Field(default=10.0, gt=0)
    """The sliding window."""
    min_retries: int = Field(default=3, ge=0)
    """Retries always allowed per window, so a quiet provider can still retry."""


class _ProviderBase(_Strict):
    retry_budget: RetryBudgetConfig = Field(default_factory=RetryBudgetConfig)
    """Shared by every model of the provider, per executor process."""


class MockProviderConfig(_ProviderBase):
    """The built-in deterministic provider; no network."""

    kind: Literal["mock"]


class _HttpProviderConfig(_ProviderBase):
    api_key_env: str | None = None
    """Name of the environment variable holding the API key."""
    api_key_file: Path | None = None
    """Path of a file holding the API key (a mounted secret); read once at start-up."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers on every request to this provider."""
    max_connections: int = Field(default=100, gt=0)
    """Size of the connection pool."""
    idle_connection_s: float = Field(default=4.0, gt=0)
    """A pooled connection idle this long is closed. Keep it below the upstream's keep-alive
    (5 s in uvicorn, hence vLLM and most Python servers): a request sent on a connection
    the server is closing at that moment fails as the provider unavailable."""
    http2: bool = False
    """Must stay off: calls go over HTTP/1.1. httpx's HTTP/2 (httpcore, h2), which the
    executor used for TLS upstreams until 2026-11-28, broke three things against a real TLS
    upstream (`python -m bench.provider_http`, bench/RESULTS.md): a caller leaving a stream
    did not stop the upstream's answer, which ran on, billed, to its end; after 100 streams
    left early on a connection every later call on it failed ("Max outbound streams is 100,
    100 open"); and calls in flight failed when the upstream retired the connection (a
    GOAWAY, after 1,000 requests in nginx and hypercorn). It also cost 2.0-2.7 times the
    CPU per call. Kept so that a file saying `http2: false` loads."""
    ca_file: Path | None = None
    """PEM file of the certificate authorities this provider's TLS certificate is checked
    against (a private CA), instead of the public ones; read at start-up."""

    @field_validator("http2")
    @classmethod
    def _no_http2(cls, value: bool) -> bool:
        if value:
            raise ValueError(
                "HTTP/2 is not supported: httpx's neither stops the upstream when a caller "
                "leaves a stream nor frees the stream; providers are called over HTTP/1.1"
            )
        return value


class OpenAICompatibleProviderConfig(_HttpProviderConfig):
    """Any server speaking OpenAI's `/v1/chat/completions` (vLLM, Ollama, llama.cpp, ...)."""

    kind: Literal["openai_compatible"]
    base_url: str
    """Base URL up to and including `/v1`."""


class OpenAIProviderConfig(_HttpProviderConfig):
    """OpenAI's own API."""

    kind: Literal["openai"]
    base_url: str = "https://api.openai.com/v1"
    """Base URL up to and including `/v1`."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key."""
    organization: str | None = None
    """Sent as OpenAI-Organization when set."""


class AnthropicProviderConfig(_HttpProviderConfig):
    """Anthropic's Messages API."""

    kind: Literal["anthropic"]
    base_url: str = "https://api.anthropic.com/v1"
    """Base URL up to and including `/v1`."""
    api_key_env: str | None = "ANTHROPIC_API_KEY"
    """Name of the environment variable holding the API key."""
    api_version: str = "2023-06-01"
    """Sent as anthropic-version."""


ProviderConfig = Annotated[
    MockProviderConfig
    | OpenAICompatibleProviderConfig
    | OpenAIProviderConfig
    | AnthropicProviderConfig,
    Field(discriminator="kind"),
]
HttpProviderConfig = OpenAICompatibleProviderConfig | OpenAIProviderConfig | AnthropicProviderConfig


class TimeoutConfig(_Strict):
    """How long each phase of one attempt may take (never beyond the caller's deadline)."""

    connect_s: float = Field(default=5.0, gt=0)
    """Opening a connection."""
    first_token_s: float = Field(default=60.0, gt=0)
    """From sending the request to the first piece of the answer."""
    stall_s: float = Field(default=30.0, gt=0)
    """Between two pieces of a streamed answer."""


class RetryConfig(_Strict):
    """Retries of one call: only before its answer started, within the deadline and budget."""

    max_attempts: int = Field(default=3, ge=1, le=10)
    """Attempts in all, the first included."""
    base_delay_s: float = Field(default=0.2, gt=0)
    """Backoff before the second attempt; doubles each time, with full jitter."""
    max_delay_s: float = Field(default=5.0, gt=0)
    """Backoff cap (a Retry-After from the provider wins, if it fits the deadline)."""


class BreakerConfig(_Strict):
    """When the model's circuit breaker opens and how it recovers (shared by all replicas)."""

    consecutive_failures: int = Field(default=5, ge=1)
    """Failures in a row that open it."""
    failure_ratio: float = Field(default=0.5, gt=0, le=1)
    """Share of failed attempts in the window that opens it..."""
    min_requests: int = Field(default=10, ge=1)
    """...once the window holds at least this many attempts."""
    window_s: float = Field(default=30.0, gt=0)
    """The ratio's window."""
    cooldown_s: float = Field(default=5.0, gt=0)
    """How long it stays open before a probe; doubles after each failed probe..."""
    max_cooldown_s: float = Field(default=120.0, gt=0)
    """...up to this."""
    probe_timeout_s: float = Field(default=30.0, gt=0)
    """How long one probe holds the half-open breaker before another may try."""


class ModelConfig(_Strict):
    """One model alias."""

    name: str = ""
    """The alias; filled from the key of the `models` mapping."""
    provider: str
    """Key of the provider entry that serves the model."""
    upstream_model: str
    """The provider's name for the model."""
    kind: Literal["chat", "embedding"] = "chat"
    """What the model does: chat completions, or embeddings."""
    input_usd_per_million_tokens: Decimal = Decimal(0)
    """Price of a million prompt tokens in USD (at most 6 decimals)."""
    output_usd_per_million_tokens: Decimal = Decimal(0)
    """Price of a million output tokens in USD (at most 6 decimals)."""
    max_output_tokens: int = Field(default=4096, gt=0)
    """Default and upper bound for a request's max_output_tokens."""
    context_window: int = Field(default=128_000, gt=0)
    """Prompt plus output tokens the model accepts."""
    dimensions: int | None = Field(default=None, gt=0)
    """For embedding models: the vector length to ask for (when the provider can choose)."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers on requests for this model (on top of the provider's)."""
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)
    """Connect, first-token and stall timeouts of each attempt."""
    retry: RetryConfig = Field(default_factory=RetryConfig)
    """How failed attempts are retried."""
    fallbacks: list[str] = Field(default_factory=list)
    """Models to try next, in order, when this one fails before answering (or its breaker
    is open); a route's candidates take their place when the request names a route."""
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    """The model's circuit breaker."""
    hedge_after_s: float | None = Field(default=None, gt=0)
    """When set: if no answer has started this long after the first attempt, a second one
    races it; the first to answer wins and the other is cancelled."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Provider-specific options (the mock's delays, for instance)."""

    @field_validator("input_usd_per_million_tokens", "output_usd_per_million_tokens")
    @classmethod
    def _whole_micros(cls, price: Decimal) -> Decimal:
        if price < 0 or (price * 1_000_000) % 1 != 0:
            raise ValueError("must be >= 0 with at most 6 decimals")
        return price

    @property
    def input_micros_per_million(self) -> int:
        """Price of a million prompt tokens in millionths of a USD."""
        return int(self.input_usd_per_million_tokens * 1_000_000)

    @property
    def output_micros_per_million(self) -> int:
        """Price of a million output tokens in millionths of a USD."""
        return int(self.output_usd_per_million_tokens * 1_000_000)

    def cost(self, usage: common_pb2.Usage) -> common_pb2.Cost:
        """What `usage` costs at this model's prices, each part rounded up to a micro-USD."""
        input_cost = _ceil_div(usage.input_tokens * self.input_micros_per_million, 1_000_000)
        output_cost = _ceil_div(usage.output_tokens * self.output_micros_per_million, 1_000_000)
        return common_pb2.Cost(
            input_usd_micros=input_cost,
            output_usd_micros=output_cost,
            total_usd_micros=input_cost + output_cost,
        )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class Catalog(_Strict):
    """Providers and models, validated as a whole."""

    providers: dict[str, ProviderConfig]
    models: dict[str, ModelConfig]

    @model_validator(mode="before")
    @classmethod
    def _name_models(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            data = dict(data)
            data["models"] = {
                name: {**spec, "name": name} if isinstance(spec, dict) else spec
                for name, spec in data["models"].items()
            }
        return data

    @model_validator(mode="after")
    def _references_exist(self) -> Catalog:
        for model in self.models.values():
            if model.provider not in self.providers:
                raise ValueError(f"model {model.name!r} names unknown provider {model.provider!r}")
            for fallback in model.fallbacks:
                target = self.models.get(fallback)
                if target is None or target.kind != model.kind or fallback == model.name:
                    raise ValueError(f"model {model.name!r} has a bad fallback {fallback!r}")
        return self

    def candidates(self, alias: str) -> list[ModelConfig]:
        """The model and its fallbacks, in order, without repeats."""
        first = self.models[alias]
        chain = [first, *(self.models[f] for f in first.fallbacks)]
        return list({m.name: m for m in chain}.values())

    def get(self, alias: str) -> ModelConfig | None:
        """The model with this alias, or None."""
        return self.models.get(alias)


def load_catalog(path: Path) -> Catalog:
    """Reads and validates a models file."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read models file {path}: {err}") from err
    try:
        return Catalog.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(f"invalid models file {path}:\n{err}") from err
