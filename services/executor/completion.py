"""The executor's domain: resolve a model alias to its provider and run the call.

Deadlines: the gRPC deadline bounds the call (the server cancels it when it passes), and
each provider derives its own timeouts from what remains. Cancellation: a cancelled call
closes the provider's stream at once (the iterator is closed, and with it the upstream
HTTP response).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from services.common.calls import Deadline
from services.common.catalog import Catalog, ModelConfig
from services.common.errors import RequestInvalid
from services.common.validation import check_generation
from services.executor.providers.base import Completion, Event, Provider, ProviderRequest
from strata.common.v1 import common_pb2

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class Execution:
    """A validated call, bound to its provider."""

    request: ProviderRequest
    provider: Provider

    @property
    def model(self) -> ModelConfig:
        """The model that answers."""
        return self.request.model

    async def stream(self) -> AsyncGenerator[Event, None]:
        """The provider's events; the upstream call is closed when this iterator is."""
        async with aclosing(self.provider.stream(self.request)) as events:
            async for event in events:
                yield event

    async def complete(self) -> Completion:
        """The whole answer."""
        return await self.provider.complete(self.request)


def _page_token(last_alias: str) -> str:
    return base64.urlsafe_b64encode(last_alias.encode()).decode()


class Executor:
    """Runs calls against the catalog's providers."""

    def __init__(self, catalog: Catalog, providers: Mapping[str, Provider]) -> None:
        self._catalog = catalog
        self._providers = providers
        self._aliases = sorted(catalog.models)

    def prepare(
        self,
        request_id: str,
        model: str,
        messages: Sequence[common_pb2.ChatMessage],
        params: common_pb2.GenerationParams,
        deadline: Deadline,
    ) -> Execution:
        """Validates a call; raises RequestInvalid or ModelNotFound."""
        config, max_output = check_generation(self._catalog, model, messages, params)
        request = ProviderRequest(
            model=config,
            messages=messages,
            params=params,
            max_output_tokens=max_output,
            deadline=deadline,
            request_id=request_id,
        )
        return Execution(request, self._providers[config.provider])

    def list_models(self, page_size: int, page_token: str) -> tuple[list[ModelConfig], str]:
        """A page of models in alias order, and the token of the next page ("" at the end)."""
        if page_size < 0:
            raise RequestInvalid.field("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = 0
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode()).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                after = None
            # The decoder skips stray characters; only a token this API made round-trips.
            if after is None or _page_token(after) != page_token:
                raise RequestInvalid.field("page_token", "is not a token this API gave")
            start = next((i for i, a in enumerate(self._aliases) if a > after), len(self._aliases))
        page = self._aliases[start : start + size]
        more = start + size < len(self._aliases)
        token = _page_token(page[-1]) if more and page else ""
        return [self._catalog.models[a] for a in page], token

    async def aclose(self) -> None:
        """Closes every provider's connections."""
        for provider in self._providers.values():
            await provider.aclose()
