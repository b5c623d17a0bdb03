"""The services' channels (services.common.calls.open_channel): every call, of every kind,
carries the caller's trace context and the internal token, next to the caller's metadata."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.common.calls import open_channel
from services.common.security import INTERNAL_TOKEN_KEY, Trust

STALE = "00-11111111111111111111111111111111-2222222222222222-01"


def _seen(context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
    received: dict[str, list[str]] = {}
    for key, value in context.invocation_metadata() or ():
        received.setdefault(key, []).append(value)
    return json.dumps(received).encode()


async def _unary(request: bytes, context: Any) -> bytes:
    return _seen(context)


async def _server_streaming(request: bytes, context: Any) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield _seen(context)


async def _client_streaming(requests: AsyncIterator[bytes], context: Any) -> bytes:
    async for _ in requests:
        pass
    return _seen(context)


async def _both_streaming(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
    async for _ in requests:
        yield _seen(context)


@pytest.fixture
async def address() -> AsyncIterator[str]:
    """A server whose methods answer with the metadata each call arrived with."""
    server = grpc.aio.server()
    plain = {"request_deserializer": bytes, "response_serializer": bytes}
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "test.Seen",
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(_unary, **plain),
                    "ServerStreaming": grpc.unary_stream_rpc_method_handler(
                        _server_streaming, **plain
                    ),
                    "ClientStreaming": grpc.stream_unary_rpc_method_handler(
                        _client_streaming, **plain
                    ),
                    "BothStreaming": grpc.stream_stream_rpc_method_handler(
                        _both_streaming, **plain
                    ),
                },
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


async def _requests() -> AsyncIterator[bytes]:
    for _ in range(2):
        yield b"x"


async def _every_kind(channel: grpc.aio.Channel, metadata: Any) -> list[dict[str, list[str]]]:
    """What the server saw, once per kind of call."""
    seen = [await channel.unary_unary("/test.Seen/Unary")(b"x", metadata=metadata, timeout=5)]
    async for reply in channel.unary_stream("/test.Seen/ServerStreaming")(
        b"x", metadata=metadata, timeout=5
    ):
        seen.append(reply)
    seen.append(
        await channel.stream_unary("/test.Seen/ClientStreaming")(
            _requests(), metadata=metadata, timeout=5
        )
    )
    async for reply in channel.stream_stream("/test.Seen/BothStreaming")(
        _requests(), metadata=metadata, timeout=5
    ):
        seen.append(reply)
    return [json.loads(s) for s in seen]


async def test_every_call_carries_the_trace_context_and_the_token(address: str) -> None:
    channel = open_channel(address, trust=Trust(token="s3cret"))
    tracer = TracerProvider().get_tracer("test")
    caller = [("x-request-id", "r-1"), ("traceparent", STALE), (INTERNAL_TOKEN_KEY, "forged")]
    try:
        with tracer.start_as_current_span("caller") as span:
            seen = await _every_kind(channel, caller)
    finally:
        await channel.close()
    context = span.get_span_context()
    expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"
    assert len(seen) == 1 + 3 + 1 + 2
    for received in seen:
        assert received["x-request-id"] == ["r-1"]
        assert received["traceparent"] == [expected]
        assert received[INTERNAL_TOKEN_KEY] == ["s3cret"]


async def test_without_a_token_none_is_sent_and_without_a_span_no_context(address: str) -> None:
    async with open_channel(address) as channel:
        seen = await _every_kind(channel, None)
    for received in seen:
        assert INTERNAL_TOKEN_KEY not in received
        assert "traceparent" not in received
