"""The handler decorators: request id for logs, and every error turned into a rich status."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from services.common.errors import ModelNotFound, stream_handler, unary_handler
from services.common.logs import current_request_id


class FakeContext:
    """Just what the decorators use of a grpc.aio.ServicerContext."""

    def __init__(self, request_id: str = "") -> None:
        self.metadata = (("x-request-id", request_id),) if request_id else ()
        self.status: grpc.Status | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    async def abort_with_status(self, status: grpc.Status) -> None:
        self.status = status
        raise grpc.aio.AbortError()


def decoded(context: FakeContext) -> tuple[int, str, str]:
    assert context.status is not None
    [(_, raw)] = [kv for kv in context.status.trailing_metadata if kv[0].endswith("-bin")]
    status = status_pb2.Status.FromString(raw)
    info = error_details_pb2.ErrorInfo()
    status.details[0].Unpack(info)
    return status.code, status.message, info.reason


class Handlers:
    @unary_handler
    async def echo_request_id(self, request: Any, context: Any) -> str:
        return current_request_id()

    @unary_handler
    async def not_found(self, request: Any, context: Any) -> str:
        raise ModelNotFound("gpt-17")

    @unary_handler
    async def broken(self, request: Any, context: Any) -> str:
        raise KeyError("secret-internal-detail")

    @stream_handler
    async def stream_then_fail(self, request: Any, context: Any):
        yield 1
        raise ModelNotFound("gpt-17")


async def test_the_request_id_is_bound_for_the_handler() -> None:
    assert await Handlers().echo_request_id(None, FakeContext("req-42")) == "req-42"
    assert await Handlers().echo_request_id(None, FakeContext()) == "-"


async def test_a_strata_error_becomes_its_rich_status() -> None:
    context = FakeContext()
    with pytest.raises(grpc.aio.AbortError):
        await Handlers().not_found(None, context)
    assert decoded(context) == (
        grpc.StatusCode.NOT_FOUND.value[0],
        "model 'gpt-17' is not configured",
        "MODEL_NOT_FOUND",
    )


async def test_an_unexpected_error_is_internal_without_its_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    context = FakeContext()
    with caplog.at_level(logging.ERROR), pytest.raises(grpc.aio.AbortError):
        await Handlers().broken(None, context)
    code, message, reason = decoded(context)
    assert (code, reason) == (grpc.StatusCode.INTERNAL.value[0], "INTERNAL")
    assert "secret-internal-detail" not in message
    assert "secret-internal-detail" in caplog.text  # the traceback is logged, not sent


async def test_a_stream_error_after_messages_is_still_a_status() -> None:
    context = FakeContext()
    received = []
    with pytest.raises(grpc.aio.AbortError):
        async for item in Handlers().stream_then_fail(None, context):
            received.append(item)
    assert received == [1]
    assert decoded(context)[2] == "MODEL_NOT_FOUND"
