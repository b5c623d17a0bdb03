"""The deterministic mock provider: no network, the same answer for the same prompt.

The answer depends only on the conversation, the seed and the model; it streams word by
word. The model's `upstream_model` picks a behaviour, so failure paths can be tested on
purpose (after tensorzero's dummy provider):

    echo (or any other name)  a normal answer
    slow-first-token          waits `first_token_delay_ms` (default 1500) before the first word
    slow-chunks               waits `chunk_delay_ms` (default 200) between words
    rate-limited              refuses like an HTTP 429 with Retry-After `retry_after_s` (default 2)
    error                     fails like an HTTP 500
    hang                      accepts the call and never sends a word
    cut                       sends half the answer, then the stream breaks
    malformed                 answers with something that cannot be parsed
    fail-once                 fails like an HTTP 500 on the first attempt of each request,
                              then answers (for retries)

With tools and a tool choice of REQUIRED or FUNCTION it calls a tool (finish TOOL_CALLS).
Embedding models get bag-of-words vectors: texts that share words have close vectors.

Options (in the model's `options`): first_token_delay_ms, chunk_delay_ms, words_per_chunk,
retry_after_s.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
from collections.abc import AsyncGenerator, Sequence

from services.common.calls import Deadline
from services.common.catalog import ModelConfig
from services.common.chat import assemble_tool_calls
from services.common.errors import (
    BadUpstreamResponse,
    ProviderUnavailable,
    StreamInterrupted,
    UpstreamRateLimited,
)
from services.executor.providers.base import (
    Accepted,
    Completion,
    Embeddings,
    Event,
    Finished,
    ProviderRequest,
    TextDelta,
    ToolCallPiece,
)
from strata.common.v1 import common_pb2

_SENTENCES = (
    "Strata admits the request, looks in the cache, then streams the answer from a model.",
    "Every stream ends with exactly one final chunk that carries usage and cost.",
    "Rate limits and budgets hold across replicas because Redis decides each one atomically.",
    "A cached answer is served only inside the tenant, model and parameters it was stored for.",
    "Deadlines and cancellation travel with the request through all four services.",
    "Errors reach the client with a gRPC code and a stable reason it can act on.",
    "This mock answers deterministically: the same conversation always gives the same words.",
    "Each service scales on its own; shared state lives in Redis and Qdrant.",
)


def _words(request: ProviderRequest) -> list[str]:
    digest = hashlib.sha256()
    digest.update(request.model.upstream_model.encode())
    digest.update(str(request.params.seed if request.params.HasField("seed") else "").encode())
    for message in request.messages:
        digest.update(f"\x00{message.role}\x00{message.content}".encode())
    seed = digest.digest()
    last_user = next(
        (m.content for m in reversed(request.messages) if m.role == common_pb2.ROLE_USER), ""
    )
    excerpt = last_user.split()[:8]
    words = ["Mock", "answer:"]
    if excerpt:
        words = ["Mock", "answer", "to", *f"“{' '.join(excerpt)}”:".split()]
    for i in range(2 + seed[0] % 3):
        words += _SENTENCES[seed[i + 1] % len(_SENTENCES)].split()
    return words


def _answer(request: ProviderRequest) -> tuple[list[str], common_pb2.FinishReason]:
    """The words of the answer and why it ends (limit or stop sequence).

    Joined with single spaces the words give the exact text; a text cut by a stop sequence
    right after a space ends in an empty word, which is sent but is not a token.
    """
    words = _words(request)
    finish = common_pb2.FINISH_REASON_STOP
    if len(words) > request.max_output_tokens:
        words = words[: request.max_output_tokens]
        finish = common_pb2.FINISH_REASON_LENGTH
    text = " ".join(words)
    for stop in request.params.stop:
        at = text.find(stop)
        if at >= 0:
            words = text[:at].split(" ") if at else []
            finish = common_pb2.FINISH_REASON_STOP
            text = text[:at]
    return words, finish


def _input_tokens(request: ProviderRequest) -> int:
    return sum(len(m.content.split()) + 3 for m in request.messages) + 3


_FORCED_TOOL = {common_pb2.TOOL_CHOICE_MODE_REQUIRED, common_pb2.TOOL_CHOICE_MODE_FUNCTION}
DEFAULT_DIMENSIONS = 64


def _tool_call(request: ProviderRequest) -> list[common_pb2.ToolCallDelta] | None:
    """The pieces of the tool call the mock makes, when the request forces one."""
    params = request.params
    if not params.tools or params.tool_choice.mode not in _FORCED_TOOL:
        return None
    name = params.tool_choice.function_name or params.tools[0].name
    last_user = next(
        (m.content for m in reversed(request.messages) if m.role == common_pb2.ROLE_USER), ""
    )
    arguments = json.dumps({"query": " ".join(last_user.split()[:8])})
    call_id = "call_" + hashlib.sha256(arguments.encode()).hexdigest()[:12]
    middle = len(arguments) // 2
    return [
        common_pb2.ToolCallDelta(index=0, id=call_id, name=name, arguments_json=arguments[:middle]),
        common_pb2.ToolCallDelta(index=0, arguments_json=arguments[middle:]),
    ]


def embed_text(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector: each word adds to buckets chosen by its hash."""
    vector = [0.0] * dimensions
    for word in re.findall(r"\w+", text.lower()):
        digest = hashlib.sha256(word.encode()).digest()
        for i in range(0, 8, 2):
            vector[digest[i] % dimensions] += 1.0 if digest[i + 1] % 2 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


class MockProvider:
    """A provider that answers from the prompt alone."""

    def __init__(self) -> None:
        self._failed_once: set[str] = set()

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Event, None]:
        behaviour = request.model.upstream_model
        options = request.model.options
        if behaviour == "rate-limited":
            raise UpstreamRateLimited(
                "mock provider is rate limited (HTTP 429)",
                retry_after_s=float(options.get("retry_after_s", 2)),
            )
        if behaviour == "error":
            raise ProviderUnavailable("mock provider failed (HTTP 500)")
        if behaviour == "malformed":
            raise BadUpstreamResponse("mock provider sent a body that is not valid JSON")
        if behaviour == "fail-once" and request.request_id not in self._failed_once:
            self._failed_once.add(request.request_id)
            raise ProviderUnavailable("mock provider failed once (HTTP 500)")
        self._failed_once.discard(request.request_id)
        yield Accepted()
        if behaviour == "hang":
            await asyncio.Event().wait()

        first_delay = float(
            options.get("first_token_delay_ms", 1500 if behaviour == "slow-first-token" else 0)
        )
        chunk_delay = float(options.get("chunk_delay_ms", 200 if behaviour == "slow-chunks" else 0))
        if first_delay:
            await asyncio.sleep(first_delay / 1000)

        tool_pieces = _tool_call(request)
        if tool_pieces is not None:
            for tool_piece in tool_pieces:
                yield ToolCallPiece(tool_piece)
            arguments = "".join(p.arguments_json for p in tool_pieces)
            yield Finished(
                finish_reason=common_pb2.FINISH_REASON_TOOL_CALLS,
                usage=common_pb2.Usage(
                    input_tokens=_input_tokens(request), output_tokens=len(arguments.split())
                ),
                provider_model=f"mock/{behaviour}",
            )
            return

        per_chunk = max(1, int(options.get("words_per_chunk", 1)))
        words, finish = _answer(request)
        if behaviour == "cut":
            words = words[: len(words) // 2]
        for i in range(0, len(words), per_chunk):
            if i and chunk_delay:
                await asyncio.sleep(chunk_delay / 1000)
            piece = " ".join(words[i : i + per_chunk])
            yield TextDelta(piece if i == 0 else " " + piece)
        if behaviour == "cut":
            raise StreamInterrupted("mock provider's stream broke before its end")
        yield Finished(
            finish_reason=finish,
            usage=common_pb2.Usage(
                input_tokens=_input_tokens(request), output_tokens=sum(1 for w in words if w)
            ),
            provider_model=f"mock/{behaviour}",
        )

    async def complete(self, request: ProviderRequest) -> Completion:
        parts: list[str] = []
        pieces: list[common_pb2.ToolCallDelta] = []
        async for event in self.stream(request):
            if isinstance(event, TextDelta):
                parts.append(event.text)
            elif isinstance(event, ToolCallPiece):
                pieces.append(event.delta)
            elif isinstance(event, Finished):
                return Completion(
                    "".join(parts),
                    event.finish_reason,
                    event.usage,
                    event.provider_model,
                    assemble_tool_calls(pieces),
                )
        raise StreamInterrupted("mock provider ended without an answer")

    async def embed(
        self, model: ModelConfig, inputs: Sequence[str], deadline: Deadline
    ) -> Embeddings:
        if model.upstream_model == "error":
            raise ProviderUnavailable("mock provider failed (HTTP 500)")
        dimensions = model.dimensions or DEFAULT_DIMENSIONS
        return Embeddings(
            vectors=[embed_text(text, dimensions) for text in inputs],
            usage=common_pb2.Usage(input_tokens=sum(len(t.split()) for t in inputs)),
        )

    async def aclose(self) -> None:
        return None
