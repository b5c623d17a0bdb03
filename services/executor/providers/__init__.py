"""Provider adapters, one file each, and the table that builds them from the catalog."""

from __future__ import annotations

from services.common.catalog import (
    AnthropicProviderConfig,
    Catalog,
    MockProviderConfig,
    OpenAICompatibleProviderConfig,
    OpenAIProviderConfig,
)
from services.executor.providers.anthropic import AnthropicProvider
from services.executor.providers.base import Provider
from services.executor.providers.mock import MockProvider
from services.executor.providers.openai import OpenAIProvider
from services.executor.providers.openai_compatible import OpenAICompatibleProvider


def build_providers(catalog: Catalog) -> dict[str, Provider]:
    """One adapter (with its connection pool) per provider entry of the catalog."""
    providers: dict[str, Provider] = {}
    for name, config in catalog.providers.items():
        if isinstance(config, MockProviderConfig):
            providers[name] = MockProvider()
        elif isinstance(config, OpenAIProviderConfig):
            providers[name] = OpenAIProvider(name, config)
        elif isinstance(config, OpenAICompatibleProviderConfig):
            providers[name] = OpenAICompatibleProvider(name, config)
        elif isinstance(config, AnthropicProviderConfig):
            providers[name] = AnthropicProvider(name, config)
    return providers
