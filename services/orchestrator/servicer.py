"""gRPC face of the public API: proto in, `Generator`, proto out."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import grpc

from services.common.calls import Deadline
from services.common.chat import assemble_tool_calls
from services.common.errors import ApiKeyInvalid, stream_handler, unary_handler
from services.orchestrator.generation import (
    Event,
    Finished,
    GenerateRequest,
    Generator,
    Started,
    ToolPieces,
)
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

_Chunk = orchestrator_pb2.StreamGenerateResponse


def bearer_key(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The API key of `authorization: Bearer <key>`; UNAUTHENTICATED when there is none."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    raise ApiKeyInvalid("missing `authorization: Bearer <api key>` metadata")


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Implements strata.orchestrator.v1.OrchestratorService."""

    def __init__(self, generator: Generator, default_deadline_s: float) -> None:
        self._generator = generator
        self._default_deadline_s = default_deadline_s

    def _events(
        self,
        request: GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        stream: bool,
    ) -> AsyncGenerator[Event, None]:
        return self._generator.generate(
            request,
            bearer_key(context),
            Deadline.of_call(context, self._default_deadline_s),
            stream=stream,
        )

    @unary_handler
    async def Generate(
        self,
        request: orchestrator_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> orchestrator_pb2.GenerateResponse:
        response = orchestrator_pb2.GenerateResponse()
        parts: list[str] = []
        pieces: list[common_pb2.ToolCallDelta] = []
        events = self._events(request, context, stream=False)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, str):
                    parts.append(event)
                elif isinstance(event, ToolPieces):
                    pieces.extend(event.pieces)
                elif isinstance(event, Started):
                    response.request_id = event.request_id
                    response.model = event.model
                    response.cache_match = event.cache_match
                else:
                    response.finish_reason = event.finish_reason
                    response.usage.CopyFrom(event.usage)
                    response.cost.CopyFrom(event.cost)
                    response.cache_status = event.cache_status
        response.text = "".join(parts)
        response.tool_calls.extend(assemble_tool_calls(pieces))
        return response

    @stream_handler
    async def StreamGenerate(
        self,
        request: orchestrator_pb2.StreamGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[orchestrator_pb2.StreamGenerateResponse, None]:
        events = self._events(request, context, stream=True)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, str):
                    yield _Chunk(delta=_Chunk.Delta(text=event))
                elif isinstance(event, ToolPieces):
                    yield _Chunk(delta=_Chunk.Delta(tool_calls=event.pieces))
                elif isinstance(event, Started):
                    yield _Chunk(
                        start=_Chunk.Start(
                            request_id=event.request_id,
                            model=event.model,
                            cache_status=event.cache_status,
                            cache_match=event.cache_match,
                        )
                    )
                else:
                    yield _Chunk(final=_final(event))


def _final(event: Finished) -> orchestrator_pb2.StreamGenerateResponse.Final:
    return _Chunk.Final(
        finish_reason=event.finish_reason,
        usage=event.usage,
        cost=event.cost,
        cache_status=event.cache_status,
    )
