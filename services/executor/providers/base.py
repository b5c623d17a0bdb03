"""What every provider adapter implements, in Strata's own terms.

A provider turns a `ProviderRequest` into a stream of events: `Accepted` once the provider
has taken the call, `TextDelta`s in order, then exactly one `Finished` — or it raises a
`services.common.errors.ProviderError`. It never retries or falls back; the layer above
decides that.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Protocol

from services.common.calls import Deadline
from services.common.catalog import ModelConfig
from strata.common.v1 import common_pb2


@dataclass(frozen=True, slots=True)
class ProviderRequest:
    """One call to a model, validated."""

    model: ModelConfig
    messages: Sequence[common_pb2.ChatMessage]
    params: common_pb2.GenerationParams
    max_output_tokens: int
    """Effective bound: the request's, or the model's default."""
    deadline: Deadline
    request_id: str


@dataclass(frozen=True, slots=True)
class Accepted:
    """The provider accepted the call; output may follow."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The next piece of the answer."""

    text: str


@dataclass(frozen=True, slots=True)
class Finished:
    """The answer is complete."""

    finish_reason: common_pb2.FinishReason
    usage: common_pb2.Usage
    provider_model: str


Event = Accepted | TextDelta | Finished


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer."""

    text: str
    finish_reason: common_pb2.FinishReason
    usage: common_pb2.Usage
    provider_model: str


class Provider(Protocol):
    """A model provider adapter."""

    def stream(self, request: ProviderRequest) -> AsyncGenerator[Event, None]:
        """Streams the answer; closing the iterator early closes the upstream call."""
        ...

    async def complete(self, request: ProviderRequest) -> Completion:
        """The whole answer in one call."""
        ...

    async def aclose(self) -> None:
        """Releases connections."""
        ...
