"""Errors a client can see, and their one mapping to gRPC.

Every error leaves a service as a `google.rpc.Status` whose details hold an `ErrorInfo`
(domain "strata", a stable UPPER_SNAKE reason, metadata with the values) and, where they
apply, `RetryInfo` and `BadRequest`. Handlers raise these classes; `unary_handler` and
`stream_handler` turn them into the status, so no handler sets a code itself.

    StrataError                       code                reason
    ├── RequestInvalid                INVALID_ARGUMENT    REQUEST_INVALID (+ BadRequest), or
    │                                                     PROMPT_TOO_LARGE, TEMPLATE_INVALID
    ├── ApiKeyInvalid                 UNAUTHENTICATED     API_KEY_INVALID
    ├── AdminTokenInvalid             UNAUTHENTICATED     ADMIN_TOKEN_INVALID
    ├── InternalTokenInvalid          UNAUTHENTICATED     INTERNAL_TOKEN_INVALID
    ├── RequestInProgress             ABORTED             REQUEST_IN_PROGRESS
    ├── IdempotencyKeyReused          FAILED_PRECONDITION IDEMPOTENCY_KEY_REUSED
    ├── ModelNotFound                 NOT_FOUND           MODEL_NOT_FOUND
    ├── RouteNotFound                 NOT_FOUND           ROUTE_NOT_FOUND
    ├── TemplateNotFound              NOT_FOUND           TEMPLATE_NOT_FOUND
    ├── PipelineNotFound              NOT_FOUND           PIPELINE_NOT_FOUND
    ├── JobNotFound                   NOT_FOUND           JOB_NOT_FOUND
    ├── TraceNotFound                 NOT_FOUND           TRACE_NOT_FOUND
    ├── StepFailed                    (the step's)        (the step's, or STEP_TIMEOUT,
    │                                                     STEP_INVALID)
    ├── RateLimited                   RESOURCE_EXHAUSTED  RATE_LIMITED (+ RetryInfo)
    ├── RequestExceedsLimit           RESOURCE_EXHAUSTED  REQUEST_EXCEEDS_LIMIT
    ├── ConcurrencyLimited            RESOURCE_EXHAUSTED  CONCURRENCY_LIMITED (+ RetryInfo)
    ├── Overloaded                    RESOURCE_EXHAUSTED  OVERLOADED (+ RetryInfo)
    ├── BudgetExceeded                RESOURCE_EXHAUSTED  BUDGET_EXCEEDED (+ RetryInfo)
    ├── CostCeilingExceeded           INVALID_ARGUMENT    COST_CEILING_EXCEEDED
    ├── ModelsUnavailable             UNAVAILABLE         MODELS_UNAVAILABLE (+ RetryInfo)
    │                                 RESOURCE_EXHAUSTED  MODEL_RATE_LIMITED
    ├── GuardrailBlocked              PERMISSION_DENIED   GUARDRAIL_BLOCKED
    ├── ProviderError                                     (retryable: r)
    │   ├── ProviderUnavailable       UNAVAILABLE         PROVIDER_UNAVAILABLE        r
    │   ├── ProviderAuthFailed        UNAVAILABLE         PROVIDER_AUTH_FAILED
    │   ├── UpstreamRateLimited       RESOURCE_EXHAUSTED  UPSTREAM_RATE_LIMITED       r +RetryInfo
    │   ├── UpstreamQuotaExhausted    RESOURCE_EXHAUSTED  UPSTREAM_QUOTA_EXHAUSTED
    │   ├── UpstreamRejected          INVALID_ARGUMENT    UPSTREAM_REJECTED
    │   │   ├── ContextLengthExceeded INVALID_ARGUMENT    CONTEXT_LENGTH_EXCEEDED
    │   │   └── ContentFiltered       INVALID_ARGUMENT    CONTENT_FILTERED
    │   ├── UpstreamTimeout           DEADLINE_EXCEEDED   UPSTREAM_TIMEOUT            r
    │   ├── BadUpstreamResponse       UNAVAILABLE         BAD_UPSTREAM_RESPONSE
    │   └── StreamInterrupted         UNAVAILABLE         STREAM_INTERRUPTED          r
    ├── DependencyUnavailable         UNAVAILABLE         <NAME>_UNAVAILABLE
    ├── BudgetUnverifiable            UNAVAILABLE         BUDGET_UNVERIFIABLE (+ RetryInfo)
    ├── DeadlineExceeded              DEADLINE_EXCEEDED   DEADLINE_EXCEEDED
    └── DownstreamError               (as received)       (as received)

`DownstreamError` carries a status another Strata service sent, byte for byte, so a reason
from a downstream service reaches the client unchanged. Anything else a handler raises
becomes INTERNAL/INTERNAL with a generic message; its traceback is logged, never sent.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.logs import bind_request_id

DOMAIN = "strata"
STATUS_DETAILS_KEY = "grpc-status-details-bin"

log = logging.getLogger(__name__)


class StrataError(Exception):
    """An error with a gRPC code and a stable reason, safe to show to a client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def details(self) -> list[Any]:
        """The google.rpc detail messages besides ErrorInfo."""
        return []

    def to_status(self) -> grpc.Status:
        """The rich status sent to the client."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN)
        info.metadata.update(self.metadata)
        packed = []
        for detail in [info, *self.details()]:
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=packed)
        return rpc_status.to_status(status)


class FieldViolation:
    """One invalid field of a request: its path (e.g. `params.max_output_tokens`) and why."""

    __slots__ = ("description", "field")

    def __init__(self, field: str, description: str) -> None:
        self.field = field
        self.description = description


class RequestInvalid(StrataError):
    """The request is malformed; nothing was changed."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "REQUEST_INVALID"

    def __init__(self, violations: list[FieldViolation], *, reason: str | None = None) -> None:
        message = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(message or "invalid request", reason=reason)
        self.violations = violations

    @classmethod
    def field(cls, field: str, description: str, *, reason: str | None = None) -> RequestInvalid:
        """An error about a single field."""
        return cls([FieldViolation(field, description)], reason=reason)

    def details(self) -> list[Any]:
        bad = error_details_pb2.BadRequest()
        for v in self.violations:
            bad.field_violations.add(field=v.field, description=v.description)
        return [bad]


class ApiKeyInvalid(StrataError):
    """The API key is missing, unknown or disabled."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "API_KEY_INVALID"


class ModelNotFound(StrataError):
    """The model alias is not configured."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "MODEL_NOT_FOUND"

    def __init__(self, model: str) -> None:
        super().__init__(f"model {model!r} is not configured", metadata={"model": model})


class _RetryAfter(StrataError):
    """Base for errors that tell the client when to try again."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        meta = dict(metadata or {})
        # Whole microseconds first, so float noise never rounds a delay up a unit.
        self.retry_after_us = None if retry_after_s is None else round(retry_after_s * 1e6)
        if self.retry_after_us is not None:
            meta["retry_after_ms"] = str(-(-self.retry_after_us // 1000))
        super().__init__(message, reason=reason, metadata=meta)
        self.retry_after_s = retry_after_s

    def details(self) -> list[Any]:
        if self.retry_after_us is None:
            return []
        delay = duration_pb2.Duration()
        delay.FromMicroseconds(self.retry_after_us)
        return [error_details_pb2.RetryInfo(retry_delay=delay)]


class RateLimited(_RetryAfter):
    """A limit of the caller's key was reached; RetryInfo says when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RATE_LIMITED"


class RequestExceedsLimit(StrataError):
    """One request needs more than a whole minute's allowance; it can never fit."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "REQUEST_EXCEEDS_LIMIT"

    def __init__(self, scope: str, limit: str, limit_value: int) -> None:
        super().__init__(
            f"the request needs more than the {scope}'s whole {limit} ({limit_value})",
            metadata={"scope": scope, "limit": limit, "limit_value": str(limit_value)},
        )


class ConcurrencyLimited(_RetryAfter):
    """The tenant has as many requests running as it may."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "CONCURRENCY_LIMITED"

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"the tenant already runs its {limit} concurrent requests",
            retry_after_s=1.0,
            metadata={"limit": "max_concurrent", "limit_value": str(limit)},
        )


class Overloaded(_RetryAfter):
    """The process already runs as many calls as it may (batch: its share of them); the
    call was refused before any work, and RetryInfo says when to try again."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "OVERLOADED"

    def __init__(self, limit: int, priority: str, retry_after_s: float) -> None:
        super().__init__(
            f"the server already runs its {limit} concurrent {priority} calls; retry later",
            retry_after_s=retry_after_s,
            metadata={"limit": "max_inflight", "limit_value": str(limit), "priority": priority},
        )


class BudgetExceeded(_RetryAfter):
    """The request's worst-case cost does not fit a budget; RetryInfo says when it renews."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "BUDGET_EXCEEDED"

    def __init__(self, holder: str, period: str, limit: int, remaining: int) -> None:
        super().__init__(
            f"the {period} budget of {holder} is spent or reserved",
            retry_after_s=_until_period_end(period),
            metadata={
                "scope": holder,
                "period": period,
                "limit_usd_micros": str(limit),
                "remaining_usd_micros": str(remaining),
            },
        )


def _until_period_end(period: str) -> float | None:
    now = dt.datetime.now(dt.UTC)
    if period == "day":
        end = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    elif period == "month":
        end = dt.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=dt.UTC)
    else:
        return None
    return (end - now).total_seconds()


class CostCeilingExceeded(StrataError):
    """Every candidate model's worst case costs more than the request's ceiling."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "COST_CEILING_EXCEEDED"

    def __init__(self, ceiling: int, cheapest: int) -> None:
        super().__init__(
            f"the cheapest candidate may cost {cheapest} micro-USD, above the ceiling {ceiling}",
            metadata={"ceiling_usd_micros": str(ceiling), "cheapest_usd_micros": str(cheapest)},
        )


class ModelsUnavailable(_RetryAfter):
    """No candidate model may be tried now: breakers open or model limits reached."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "MODELS_UNAVAILABLE"

    def __init__(self, skipped: list[tuple[str, str, int]]) -> None:
        why = {reason for _, reason, _ in skipped}
        if why == {"model_rate_limited"}:
            self.code = grpc.StatusCode.RESOURCE_EXHAUSTED
            self.reason = "MODEL_RATE_LIMITED"
        super().__init__(
            "no candidate model can be tried now: "
            + ", ".join(f"{model} ({reason})" for model, reason, _ in skipped),
            retry_after_s=min(wait for _, _, wait in skipped) / 1e6,
            metadata={model: reason for model, reason, _ in skipped},
        )


class GuardrailBlocked(StrataError):
    """A guardrail rule blocked the input or the output."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "GUARDRAIL_BLOCKED"

    def __init__(self, rule: str, phase: str) -> None:
        super().__init__(
            f"the {phase} was blocked by the guardrail rule {rule}",
            metadata={"rule": rule, "phase": phase},
        )


class ProviderError(StrataError):
    """The model provider did not give a complete answer.

    `retryable` says whether another attempt may succeed; the executor retries only those,
    and only before the first byte of an answer reached its caller.
    """

    code = grpc.StatusCode.UNAVAILABLE
    reason = "PROVIDER_UNAVAILABLE"
    retryable = False
    retry_after_s: float | None = None
    """The pause the provider asked for before another attempt, if it asked."""


class ProviderUnavailable(ProviderError):
    """The provider failed (5xx, refused or broken connection)."""

    retryable = True


class ProviderAuthFailed(ProviderError):
    """The provider refused Strata's credentials (a configuration problem)."""

    reason = "PROVIDER_AUTH_FAILED"


class UpstreamRateLimited(_RetryAfter, ProviderError):
    """The provider refused the call for its own rate limit (429)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_RATE_LIMITED"
    retryable = True


class UpstreamQuotaExhausted(ProviderError):
    """The provider's quota or credit is used up; retrying cannot help."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "UPSTREAM_QUOTA_EXHAUSTED"


class UpstreamRejected(ProviderError):
    """The provider rejected the request as invalid; retrying will not help."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "UPSTREAM_REJECTED"


class ContextLengthExceeded(UpstreamRejected):
    """The prompt and output limit do not fit the model's context window."""

    reason = "CONTEXT_LENGTH_EXCEEDED"


class ContentFiltered(UpstreamRejected):
    """The provider refused the request under its content policy."""

    reason = "CONTENT_FILTERED"


class UpstreamTimeout(ProviderError):
    """The provider did not answer (or start answering) in time."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "UPSTREAM_TIMEOUT"
    retryable = True


class BadUpstreamResponse(ProviderError):
    """The provider's answer could not be understood."""

    reason = "BAD_UPSTREAM_RESPONSE"


class StreamInterrupted(ProviderError):
    """The provider's stream ended before its final event; the answer is incomplete.

    After output started its metadata carries the usage so far (input_tokens,
    output_tokens), so the request is still charged for what it consumed.
    """

    reason = "STREAM_INTERRUPTED"
    retryable = True


class DependencyUnavailable(StrataError):
    """A dependency (Redis, another Strata service) did not answer."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, dependency: str, message: str | None = None) -> None:
        super().__init__(
            message or f"{dependency} is unavailable",
            reason=f"{dependency.upper()}_UNAVAILABLE",
            metadata={"dependency": dependency},
        )


class BudgetUnverifiable(_RetryAfter):
    """A budget applies (or may apply) but its ledger in Redis does not answer: admission
    fails closed rather than spend money it cannot count; RetryInfo says when to try again."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "BUDGET_UNVERIFIABLE"

    def __init__(self, holders: str, retry_after_s: float = 1.0) -> None:
        super().__init__(
            "the budget cannot be checked while its ledger is unavailable; retry later",
            retry_after_s=retry_after_s,
            metadata={"dependency": "redis", "holders": holders},
        )


class DeadlineExceeded(StrataError):
    """The caller's deadline passed before the work was done."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "DEADLINE_EXCEEDED"


class DownstreamError(StrataError):
    """A rich status received from another Strata service, passed on unchanged."""

    def __init__(self, status: status_pb2.Status, code: grpc.StatusCode) -> None:
        info = _error_info(status)
        super().__init__(
            status.message,
            reason=info.reason if info else "INTERNAL",
            metadata=dict(info.metadata) if info else None,
        )
        self.code = code
        self.status = status

    def to_status(self) -> grpc.Status:
        return rpc_status.to_status(self.status)


def _error_info(status: status_pb2.Status) -> error_details_pb2.ErrorInfo | None:
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def from_rpc_error(error: grpc.aio.AioRpcError, dependency: str) -> StrataError:
    """Turns an error from a call to another Strata service into the error to raise.

    A rich status is passed on unchanged. A bare one (the service is down, the deadline
    passed on the wire) gets a reason naming the dependency.
    """
    code = error.code()
    for key, value in error.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            if status.code == code.value[0]:
                return DownstreamError(status, code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceeded(f"deadline exceeded waiting for {dependency}")
    if code == grpc.StatusCode.CANCELLED:
        return DependencyUnavailable(dependency, f"call to {dependency} was cancelled")
    return DependencyUnavailable(dependency)


def _internal_status() -> grpc.Status:
    status = status_pb2.Status(code=code_pb2.INTERNAL, message="internal error")
    info = error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN)
    status.details.add().Pack(info)
    return rpc_status.to_status(status)


_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _request_id(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and isinstance(value, str):
            return value
    return ""


def unary_handler(
    handler: Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]],
) -> Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[_Resp]]:
    """Wraps a unary handler: binds the request id for logs and maps errors to a status."""

    @functools.wraps(handler)
    async def wrapper(
        self: _S, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> _Resp:
        bind_request_id(_request_id(context))
        try:
            return await handler(self, request, context)
        except grpc.aio.AbortError:
            raise
        except StrataError as err:
            await context.abort_with_status(err.to_status())
        except Exception:
            log.exception("unhandled error in %s", handler.__qualname__)
            await context.abort_with_status(_internal_status())
        raise AssertionError("unreachable: abort raises")

    return wrapper


def stream_handler(
    handler: Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[_Resp, None]],
) -> Callable[[_S, _Req, grpc.aio.ServicerContext[Any, Any]], AsyncGenerator[_Resp, None]]:
    """Wraps a server-streaming handler the same way as `unary_handler`."""

    @functools.wraps(handler)
    async def wrapper(
        self: _S, request: _Req, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[_Resp, None]:
        bind_request_id(_request_id(context))
        try:
            async for message in handler(self, request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except StrataError as err:
            await context.abort_with_status(err.to_status())
        except Exception:
            log.exception("unhandled error in %s", handler.__qualname__)
            await context.abort_with_status(_internal_status())

    return wrapper


class RouteNotFound(StrataError):
    """The request names a route that the routes file does not define."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "ROUTE_NOT_FOUND"

    def __init__(self, route: str) -> None:
        super().__init__(f"route {route!r} is not configured", metadata={"route": route})


class TemplateNotFound(StrataError):
    """The template, or the version of it asked for, does not exist."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "TEMPLATE_NOT_FOUND"

    def __init__(self, name: str, version: str) -> None:
        """`version` is empty when the latest was asked for."""
        label = f"{name}@{version}" if version else name
        super().__init__(
            f"template {label} does not exist", metadata={"template": name, "version": version}
        )


class PipelineNotFound(StrataError):
    """No pipeline of that name."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "PIPELINE_NOT_FOUND"


class StepFailed(StrataError):
    """A step failed and its policy stops the pipeline (the step's own code and reason are
    kept, so a client can tell a timeout or an unavailable provider from a bug)."""

    def __init__(
        self,
        message: str,
        *,
        code: grpc.StatusCode,
        reason: str,
        metadata: Mapping[str, str],
    ) -> None:
        super().__init__(message, reason=reason, metadata=metadata)
        self.code = code


class JobNotFound(StrataError):
    """No job with this id exists for the tenant (or its result has expired)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "JOB_NOT_FOUND"

    def __init__(self, job_id: str) -> None:
        super().__init__(f"job {job_id!r} not found", metadata={"job_id": job_id})


class TraceNotFound(StrataError):
    """No record of this request for the tenant (never recorded, expired, or another
    tenant's)."""

    code = grpc.StatusCode.NOT_FOUND
    reason = "TRACE_NOT_FOUND"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"no record of request {request_id!r}", metadata={"request_id": request_id}
        )


class IdempotencyKeyReused(StrataError):
    """The request id was used before for a different request."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "IDEMPOTENCY_KEY_REUSED"


class AdminTokenInvalid(StrataError):
    """The admin token is missing or wrong (or the admin API is not configured)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "ADMIN_TOKEN_INVALID"


class InternalTokenInvalid(StrataError):
    """A call to an internal service lacks the shared internal token (or has another)."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "INTERNAL_TOKEN_INVALID"


class RequestInProgress(StrataError):
    """The same request id is still being applied by another call."""

    code = grpc.StatusCode.ABORTED
    reason = "REQUEST_IN_PROGRESS"
