"""Calls from one Strata service to another: channels, deadlines, metadata.

A process opens one channel per downstream address and reuses it for every call. Each call
carries what remains of the caller's deadline and the request id, and, when configured, the
internal token over mutual TLS (`security.Trust`).

A call that fails with UNAVAILABLE is retried by gRPC (at most 3 attempts, 50 ms backoff
doubling to 500 ms, within the call's deadline) only for the methods in `IDEMPOTENT`:
reads, and Admit/Settle/SettleBatch, which are idempotent by request id. Everything else,
and above all a stream of generated text (StreamComplete), is never retried by the channel.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
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
    "strata.control.v1.ControlService": (
        "Admit",
        "Settle",
        "SettleBatch",
        "CheckOutput",
        "Authenticate",
    ),
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
    TLS (with this process's certificate) and the internal token when they are set. Every
    call on it carries the caller's trace context (`CallerChannel`)."""
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
    credentials = trust.channel_credentials() if trust is not None else None
    if credentials is None:
        channel = grpc.aio.insecure_channel(address, options=options)
    else:
        channel = grpc.aio.secure_channel(address, credentials, options=options)
    return CallerChannel(channel, trust.token if trust is not None else None)


_Pairs = Sequence[tuple[str, str | bytes]]
"""A call's metadata as key-value pairs (not grpc.aio.Metadata)."""


class _Adding:
    """A method of a `CallerChannel`: each call gets the channel's metadata added."""

    __slots__ = ("_add", "_method")

    def __init__(self, method: Any, add: Callable[[_Pairs | None], _Pairs]) -> None:
        self._method = method
        self._add = add

    def __call__(self, request: Any, *, metadata: _Pairs | None = None, **options: Any) -> Any:
        return self._method(request, metadata=self._add(metadata), **options)


class CallerChannel(grpc.aio.Channel):
    """A channel whose every call carries the caller's trace context and, when `token` is
    set, the internal token, whatever the stub or the caller passed.

    They are added as each call is made. grpc.aio's client interceptors (one for each)
    cost the caller a task and wrapper objects per call and a wrapper per streamed
    message: 31 µs more CPU per unary call (405 against 374) and 294 µs more per stream
    of 20 messages (`python -m bench.grpc_hop --client --rounds 5`, medians). They also
    covered unary requests only, with a class per kind of call."""

    def __init__(self, channel: grpc.aio.Channel, token: str | None = None) -> None:
        self._channel = channel
        self._token = token

    def _metadata(self, metadata: _Pairs | None) -> _Pairs:
        added = telemetry.inject_metadata(metadata)
        if self._token:
            added = [item for item in added if item[0] != security.INTERNAL_TOKEN_KEY]
            added.append((security.INTERNAL_TOKEN_KEY, self._token))
        return tuple(added)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Adding(self._channel.unary_unary(method, *args, **kwargs), self._metadata)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Adding(self._channel.unary_stream(method, *args, **kwargs), self._metadata)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Adding(self._channel.stream_unary(method, *args, **kwargs), self._metadata)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return _Adding(self._channel.stream_stream(method, *args, **kwargs), self._metadata)

    async def __aenter__(self) -> CallerChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._channel.close(None)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self._channel.get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self._channel.channel_ready()


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
