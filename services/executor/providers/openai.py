"""OpenAI's own API: Chat Completions and embeddings, as the compatible adapter speaks them,
with OpenAI's current names (`max_completion_tokens`) and its organization header."""

from __future__ import annotations

from typing import ClassVar

from services.common.catalog import OpenAICompatibleProviderConfig, OpenAIProviderConfig
from services.executor.providers.openai_compatible import OpenAICompatibleProvider


class OpenAIProvider(OpenAICompatibleProvider):
    """api.openai.com (or an Azure-style gateway with the same API)."""

    token_limit_field: ClassVar[str] = "max_completion_tokens"

    def extra_headers(
        self, config: OpenAICompatibleProviderConfig | OpenAIProviderConfig
    ) -> dict[str, str]:
        if isinstance(config, OpenAIProviderConfig) and config.organization:
            return {"openai-organization": config.organization}
        return {}
