"""Calls from one Strata service to another: channels, deadlines, metadata.

A process opens one channel per downstream address and reuses it for every call. Each call
carries what remains of the caller's deadline and the request id.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import telemetry
from services.common.errors import DeadlineExceeded

REQUEST_ID_KEY = "x-request-id"

RERUN_IF_CUT: ContextVar[Callable[[], bool]] = ContextVar("rerun_if_cut", default=lambda: False)
"""Set by whoever runs calls that run again under the same request ids when they are cut
(the job worker, when it hands a job back or another worker took it over): while it says
so, a cancelled call leaves its admission reserved for that rerun instead of settling it,
so the work is charged once, by the run that finishes it."""


def open_channel(address: str, max_message_bytes: int = 4 * 1024 * 1024) -> grpc.aio.Channel:
    """A channel to another service, meant to live as long as the process."""
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.enable_retries", 0),
            # Spread calls over every address a name resolves to (dns:/// of a headless
            # Service); the same as pick_first when there is one.
            ("grpc.lb_policy_name", "round_robin"),
        ],
        interceptors=telemetry.client_interceptors(),
    )


class Deadline:
    """The moment by which a request must be done, on the monotonic clock."""

    __slots__ = ("expires_at",)

    def __init__(self, expires_at: float) -> None:
        self.expires_at = expires_at

    @classmethod
    def after(cls, seconds: float) -> Deadline:
        """A deadline `seconds` from now."""
        return cls(time.monotonic() + seconds)

    @classmethod
    def of_call(cls, context: grpc.aio.ServicerContext[Any, Any], default_s: float) -> Deadline:
        """The deadline the caller set, or `default_s` from now when it set none."""
        remaining = context.time_remaining()
        if remaining is None or not math.isfinite(remaining) or remaining > default_s:
            remaining = default_s
        return cls.after(remaining)

    def remaining(self) -> float:
        """Seconds left; raises DeadlineExceeded when none are."""
        left = self.expires_at - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded("the request's deadline passed")
        return left

    def cap(self, seconds: float) -> float:
        """Seconds left, but at most `seconds`: the timeout of one step of the request."""
        return min(self.remaining(), seconds)


def request_metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    """Metadata for an internal call made on behalf of a request."""
    return ((REQUEST_ID_KEY, request_id),)


async def check_serving(channel: grpc.aio.Channel, timeout_s: float = 1.0) -> None:
    """Raises unless the service behind `channel` reports SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout_s)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise RuntimeError("not serving")
