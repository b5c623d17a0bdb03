"""What every provider adapter implements, in Strata's own terms.

A provider turns a `ProviderRequest` into a stream of events: `Accepted` once the provider
has taken the call, then the answer as `TextDelta`s and `ToolCallPiece`s in order, then
exactly one `Finished` — or it raises a `services.common.errors.ProviderError`. It never
retries, waits or falls back; `services.executor.attempts` decides that.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
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
    """The provider accepted the call (its response headers arrived); no answer yet."""


@dataclass(frozen=True, slots=True)
class TextDelta:
    """The next piece of the answer's text."""

    text: str


@dataclass(frozen=True, slots=True)
class ToolCallPiece:
    """The next piece of a tool call."""

    delta: common_pb2.ToolCallDelta


@dataclass(frozen=True, slots=True)
class Finished:
    """The answer is complete."""

    finish_reason: common_pb2.FinishReason
    usage: common_pb2.Usage
    provider_model: str


Event = Accepted | TextDelta | ToolCallPiece | Finished
Content = TextDelta | ToolCallPiece | Finished
"""Events that are part of the answer; the first one commits the call (no more retries)."""


def coalesced(events: Iterable[Content]) -> list[Content]:
    """`events` with each run of text deltas joined into one.

    Providers pass on what arrived together as one piece (what came in one read of the
    upstream's body): nothing waits for more, so a paced answer streams as it was sent, and
    a burst costs one message per service hop instead of one per upstream chunk."""
    out: list[Content] = []
    for event in events:
        if isinstance(event, TextDelta) and out and isinstance(out[-1], TextDelta):
            out[-1] = TextDelta(out[-1].text + event.text)
        else:
            out.append(event)
    return out


@dataclass(frozen=True, slots=True)
class Completion:
    """A whole answer."""

    text: str
    finish_reason: common_pb2.FinishReason
    usage: common_pb2.Usage
    provider_model: str
    tool_calls: list[common_pb2.ToolCall] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Vectors for a batch of texts, in input order."""

    vectors: list[list[float]]
    usage: common_pb2.Usage


class Provider(Protocol):
    """A model provider adapter."""

    def stream(self, request: ProviderRequest) -> AsyncGenerator[Event, None]:
        """Streams the answer; closing the generator early closes the upstream call."""
        ...

    async def complete(self, request: ProviderRequest) -> Completion:
        """The whole answer in one call."""
        ...

    async def embed(
        self, model: ModelConfig, inputs: Sequence[str], deadline: Deadline
    ) -> Embeddings:
        """Embeddings of `inputs` with an embedding model."""
        ...

    async def aclose(self) -> None:
        """Releases connections."""
        ...
