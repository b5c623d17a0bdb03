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


class MockProviderConfig(_Strict):
    """The built-in deterministic provider; no network."""

    kind: Literal["mock"]


class OpenAICompatibleProviderConfig(_Strict):
    """Any server speaking OpenAI's `/v1/chat/completions` (vLLM, Ollama, llama.cpp, ...)."""

    kind: Literal["openai_compatible"]
    base_url: str
    """Base URL up to and including `/v1`."""
    api_key_env: str | None = None
    """Name of the environment variable holding the API key; none sent when unset."""
    api_key_file: Path | None = None
    """Path of a file holding the API key (a mounted secret); read once at start-up."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers on every request to this provider."""
    connect_timeout_s: float = 5.0
    """Time allowed to open a connection."""
    max_connections: int = 100
    """Size of the connection pool."""


ProviderConfig = Annotated[
    MockProviderConfig | OpenAICompatibleProviderConfig, Field(discriminator="kind")
]


class ModelConfig(_Strict):
    """One model alias."""

    name: str = ""
    """The alias; filled from the key of the `models` mapping."""
    provider: str
    """Key of the provider entry that serves the model."""
    upstream_model: str
    """The provider's name for the model."""
    input_usd_per_million_tokens: Decimal = Decimal(0)
    """Price of a million prompt tokens in USD (at most 6 decimals)."""
    output_usd_per_million_tokens: Decimal = Decimal(0)
    """Price of a million output tokens in USD (at most 6 decimals)."""
    max_output_tokens: int = Field(default=4096, gt=0)
    """Default and upper bound for a request's max_output_tokens."""
    context_window: int = Field(default=128_000, gt=0)
    """Prompt plus output tokens the model accepts."""
    headers: dict[str, str] = Field(default_factory=dict)
    """Extra headers on requests for this model (on top of the provider's)."""
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
    def _providers_exist(self) -> Catalog:
        for model in self.models.values():
            if model.provider not in self.providers:
                raise ValueError(f"model {model.name!r} names unknown provider {model.provider!r}")
        return self

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
