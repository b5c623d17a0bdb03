"""Calls from one Strata service to another: channels, deadlines, metadata.

A process opens one channel per downstream address and reuses it for every call. Each call
carries what remains of the caller's deadline and the request id, and, when configured, the
internal token over mutual TLS (`security.Trust`).

A call that fails with UNAVAILABLE is retried by gRPC (at most 3 attempts, 50 ms backoff
doubling to 500 ms, within the call's deadline) only for the methods in `IDEMPOTENT`:
reads, and Admit/Settle, which are idempotent by request id. Everything else, and above all
a stream of generated text (StreamComplete), is never retried by the channel.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import security, telemetry
from services.common.errors import DeadlineExceeded

REQUEST_ID_KEY = "x-request-id"


def never_rerun() -> bool:
    """The default of RERUN_IF_CUT: a cut call is not run again."""
    return False


RERUN_IF_CUT: ContextVar[Callable[[], bool]] = ContextVar("rerun_if_cut", default=never_rerun)
"""Set by whoever runs calls that run again under the same request ids when they are cut
(the job worker, when it hands a job back or another worker took it over): while it says
so, a cancelled call leaves its admission reserved for that rerun instead of settling it,
so the work is charged once, by the run that finishes it. Such calls also settle only once
they end: a call settled before it ends (while the cache stores its answer) and then cut
would be charged again by its rerun."""


IDEMPOTENT: dict[str, tuple[str, ...]] = {
    "strata.control.v1.ControlService": ("Admit", "Settle", "CheckOutput", "Authenticate"),
    "strata.control.v1.ControlAdminService": ("ListApiKeys", "GetUsage", "ListBreakers"),
    "strata.cache.v1.CacheService": ("Lookup",),
    "strata.cache.v1.CacheAdminService": ("GetStats",),
    "strata.executor.v1.ExecutorService": ("ListModels",),
    "strata.orchestrator.v1.OrchestratorService": ("ListModels",),
    "strata.orchestrator.v1.JobService": ("GetJob", "ListJobs"),
    "strata.orchestrator.v1.TraceService": ("GetTrace",),
    "grpc.health.v1.Health": ("Check",),
}
"""Methods that the channel retries on UNAVAILABLE, by service."""

SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": service, "method": method}
                    for service, methods in IDEMPOTENT.items()
                    for method in methods
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.05s",
                    "maxBackoff": "0.5s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ],
        # A token bucket: after a run of failures the channel stops retrying until calls
        # succeed again, so a service that is down gets no retry storm.
        "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1},
    }
)


def open_channel(
    address: str,
    max_message_bytes: int = 4 * 1024 * 1024,
    trust: security.Trust | None = None,
) -> grpc.aio.Channel:
    """A channel to another service, meant to live as long as the process; `trust` adds
    TLS (with this process's certificate) and the internal token when they are set."""
    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.enable_retries", 1),
        ("grpc.service_config", SERVICE_CONFIG),
        # Spread calls over every address a name resolves to (dns:/// of a headless
        # Service); the same as pick_first when there is one.
        ("grpc.lb_policy_name", "round_robin"),
    ]
    interceptors = [*security.client_interceptors(trust), *telemetry.client_interceptors()]
    credentials = trust.channel_credentials() if trust is not None else None
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(address, credentials, options=options, interceptors=interceptors)


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
