"""gRPC face of the executor: proto in, `Executor`, proto out."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import grpc

from services.common.calls import Deadline
from services.common.catalog import ModelConfig
from services.common.errors import stream_handler, unary_handler
from services.executor.completion import Execution, Executor
from services.executor.providers.base import TextDelta, ToolCallPiece
from strata.executor.v1 import executor_pb2, executor_pb2_grpc

_Chunk = executor_pb2.StreamCompleteResponse
_KINDS = {"chat": executor_pb2.MODEL_KIND_CHAT, "embedding": executor_pb2.MODEL_KIND_EMBEDDING}


def _model(config: ModelConfig) -> executor_pb2.Model:
    return executor_pb2.Model(
        name=config.name,
        provider=config.provider,
        upstream_model=config.upstream_model,
        input_usd_micros_per_million_tokens=config.input_micros_per_million,
        output_usd_micros_per_million_tokens=config.output_micros_per_million,
        max_output_tokens=config.max_output_tokens,
        context_window=config.context_window,
        kind=_KINDS[config.kind],
    )


class ExecutorServicer(executor_pb2_grpc.ExecutorServiceServicer):
    """Implements strata.executor.v1.ExecutorService."""

    def __init__(self, executor: Executor, default_deadline_s: float) -> None:
        self._executor = executor
        self._default_deadline_s = default_deadline_s

    def _prepare(
        self,
        request: executor_pb2.CompleteRequest | executor_pb2.StreamCompleteRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> Execution:
        return self._executor.prepare(
            request.request_id,
            request.model,
            request.messages,
            request.params,
            Deadline.of_call(context, self._default_deadline_s),
        )

    @unary_handler
    async def Complete(
        self, request: executor_pb2.CompleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_pb2.CompleteResponse:
        execution = self._prepare(request, context)
        answer = await execution.complete()
        return executor_pb2.CompleteResponse(
            model=execution.model.name,
            provider_model=answer.provider_model,
            text=answer.text,
            finish_reason=answer.finish_reason,
            usage=answer.usage,
            cost=execution.model.cost(answer.usage),
            tool_calls=answer.tool_calls,
        )

    @stream_handler
    async def StreamComplete(
        self,
        request: executor_pb2.StreamCompleteRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[executor_pb2.StreamCompleteResponse, None]:
        execution = self._prepare(request, context)
        started = False
        async for event in execution.stream():
            if not started:
                started = True
                yield _Chunk(start=_Chunk.Start(model=execution.model.name))
            if isinstance(event, TextDelta):
                yield _Chunk(delta=_Chunk.Delta(text=event.text))
            elif isinstance(event, ToolCallPiece):
                yield _Chunk(delta=_Chunk.Delta(tool_calls=[event.delta]))
            else:
                yield _Chunk(
                    final=_Chunk.Final(
                        finish_reason=event.finish_reason,
                        usage=event.usage,
                        cost=execution.model.cost(event.usage),
                        provider_model=event.provider_model,
                    )
                )

    @unary_handler
    async def Embed(
        self, request: executor_pb2.EmbedRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_pb2.EmbedResponse:
        model, embeddings = await self._executor.embed(
            request.model, request.inputs, Deadline.of_call(context, self._default_deadline_s)
        )
        return executor_pb2.EmbedResponse(
            model=model.name,
            embeddings=[executor_pb2.Embedding(values=v) for v in embeddings.vectors],
            usage=embeddings.usage,
            cost=model.cost(embeddings.usage),
        )

    @unary_handler
    async def ListModels(
        self, request: executor_pb2.ListModelsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> executor_pb2.ListModelsResponse:
        models, token = self._executor.list_models(request.page_size, request.page_token)
        return executor_pb2.ListModelsResponse(
            models=[_model(m) for m in models], next_page_token=token
        )
