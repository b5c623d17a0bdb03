"""Server interceptors' shared mechanism: something entered around each call.

grpc.aio hands an interceptor the method's handler; to act around the call it must rebuild
the handler. `around_each_call` does that once for every kind Strata serves: a unary call
runs inside `around(request, context)`, a stream inside it from its first message to its
end (however it ends: last message, error, or cancellation from another task).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

Around = Callable[[Any, Any], AbstractAsyncContextManager[None]]
"""(request, servicer context) -> what to enter around the call."""


def around_each_call(
    handler: Any,
    around: Around,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> Any:
    """`handler` with `around` entered for each call (and its request parsed by
    `request_deserializer`, when given). Strata has no client-streaming RPC: a handler of
    such a method is returned as it is."""
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request: Any, context: Any) -> Any:
            async with around(request, context):
                return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream

        async def unary_stream(request: Any, context: Any) -> AsyncIterator[Any]:
            async with around(request, context):
                result = inner_stream(request, context)
                if inspect.isawaitable(result):
                    await result
                else:
                    async for item in result:
                        yield item

        return grpc.unary_stream_rpc_method_handler(
            unary_stream,
            request_deserializer=deserializer,
            response_serializer=handler.response_serializer,
        )
    return handler
