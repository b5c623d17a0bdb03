"""The mapping of Strata errors to rich gRPC statuses, and back from a downstream call."""

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from services.common.errors import (
    DeadlineExceeded,
    DependencyUnavailable,
    DownstreamError,
    FieldViolation,
    ModelNotFound,
    RateLimited,
    RequestInvalid,
    StrataError,
    from_rpc_error,
)

DETAILS_KEY = "grpc-status-details-bin"


def details_bytes(status: grpc.Status) -> bytes:
    values = [value for key, value in status.trailing_metadata if key == DETAILS_KEY]
    assert len(values) == 1, status.trailing_metadata
    assert isinstance(values[0], bytes)
    return values[0]


def decode(status: grpc.Status) -> status_pb2.Status:
    return status_pb2.Status.FromString(details_bytes(status))


def unpack(rich: status_pb2.Status, kind):
    found = [d for d in rich.details if d.Is(kind.DESCRIPTOR)]
    assert len(found) == 1, [d.type_url for d in rich.details]
    message = kind()
    found[0].Unpack(message)
    return message


def has_detail(rich: status_pb2.Status, kind) -> bool:
    return any(d.Is(kind.DESCRIPTOR) for d in rich.details)


def rpc_error(code: grpc.StatusCode, *trailing: tuple[str, str | bytes], details: str = ""):
    return grpc.aio.AioRpcError(
        code,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(*trailing),
        details=details,
    )


def test_request_invalid_lists_every_field_violation():
    error = RequestInvalid(
        [
            FieldViolation("model", "is required"),
            FieldViolation("params.top_p", "must be greater than 0 and at most 1"),
        ]
    )
    status = error.to_status()
    rich = decode(status)

    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert rich.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "model" in rich.message
    assert "params.top_p" in rich.message
    assert status.details == rich.message

    info = unpack(rich, error_details_pb2.ErrorInfo)
    assert info.reason == "REQUEST_INVALID"
    assert info.domain == "strata"

    bad = unpack(rich, error_details_pb2.BadRequest)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("model", "is required"),
        ("params.top_p", "must be greater than 0 and at most 1"),
    ]


def test_request_invalid_single_field_keeps_a_custom_reason():
    rich = decode(RequestInvalid.field("ttl", "too long", reason="TTL_TOO_LONG").to_status())

    assert unpack(rich, error_details_pb2.ErrorInfo).reason == "TTL_TOO_LONG"
    bad = unpack(rich, error_details_pb2.BadRequest)
    assert [v.field for v in bad.field_violations] == ["ttl"]


def test_rate_limited_carries_retry_info_and_retry_after_ms():
    status = RateLimited("slow down", retry_after_s=1.5, metadata={"limit": "rpm"}).to_status()
    rich = decode(status)

    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = unpack(rich, error_details_pb2.ErrorInfo)
    assert info.reason == "RATE_LIMITED"
    assert info.domain == "strata"
    assert dict(info.metadata) == {"limit": "rpm", "retry_after_ms": "1500"}

    retry = unpack(rich, error_details_pb2.RetryInfo)
    assert retry.retry_delay == duration_pb2.Duration(seconds=1, nanos=500_000_000)


def test_rate_limited_rounds_retry_after_ms_up():
    rich = decode(RateLimited("slow down", retry_after_s=0.0005).to_status())

    info = unpack(rich, error_details_pb2.ErrorInfo)
    assert info.metadata["retry_after_ms"] == "1"
    retry = unpack(rich, error_details_pb2.RetryInfo)
    assert retry.retry_delay.ToNanoseconds() == 500_000


def test_rate_limited_without_delay_has_no_retry_info():
    rich = decode(RateLimited("slow down", retry_after_s=None).to_status())

    assert not has_detail(rich, error_details_pb2.RetryInfo)
    assert "retry_after_ms" not in unpack(rich, error_details_pb2.ErrorInfo).metadata


def test_rate_limited_retry_after_ms_is_exact_for_whole_milliseconds():
    rich = decode(RateLimited("slow down", retry_after_s=2_007_000 / 1e6).to_status())

    assert unpack(rich, error_details_pb2.ErrorInfo).metadata["retry_after_ms"] == "2007"


def test_model_not_found_names_the_model():
    status = ModelNotFound("gpt-nope").to_status()
    rich = decode(status)

    assert status.code == grpc.StatusCode.NOT_FOUND
    info = unpack(rich, error_details_pb2.ErrorInfo)
    assert info.reason == "MODEL_NOT_FOUND"
    assert info.domain == "strata"
    assert dict(info.metadata) == {"model": "gpt-nope"}
    assert "gpt-nope" in rich.message
    assert not has_detail(rich, error_details_pb2.BadRequest)


def test_rich_downstream_status_passes_through_byte_identical():
    original = RateLimited(
        "limit reached", retry_after_s=2.0, metadata={"limit": "tokens_per_minute"}
    ).to_status()
    sent = details_bytes(original)
    error = rpc_error(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        ("x-other", "v"),
        (DETAILS_KEY, sent),
        details="limit reached",
    )

    converted = from_rpc_error(error, "control")

    assert isinstance(converted, DownstreamError)
    assert converted.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert converted.reason == "RATE_LIMITED"
    assert converted.metadata["limit"] == "tokens_per_minute"
    passed_on = converted.to_status()
    assert passed_on.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert details_bytes(passed_on) == sent


def test_downstream_status_with_a_different_code_is_not_trusted():
    sent = details_bytes(ModelNotFound("m").to_status())
    error = rpc_error(grpc.StatusCode.UNAVAILABLE, (DETAILS_KEY, sent))

    converted = from_rpc_error(error, "cache")

    assert isinstance(converted, DependencyUnavailable)
    assert converted.reason == "CACHE_UNAVAILABLE"


def test_bare_unavailable_names_the_dependency():
    converted = from_rpc_error(rpc_error(grpc.StatusCode.UNAVAILABLE, details="down"), "control")

    assert isinstance(converted, DependencyUnavailable)
    assert converted.code == grpc.StatusCode.UNAVAILABLE
    assert converted.reason == "CONTROL_UNAVAILABLE"
    rich = decode(converted.to_status())
    info = unpack(rich, error_details_pb2.ErrorInfo)
    assert info.reason == "CONTROL_UNAVAILABLE"
    assert dict(info.metadata) == {"dependency": "control"}


def test_bare_deadline_exceeded_becomes_deadline_exceeded():
    converted = from_rpc_error(rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED), "executor")

    assert isinstance(converted, DeadlineExceeded)
    assert converted.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert converted.reason == "DEADLINE_EXCEEDED"
    assert "executor" in converted.message


def test_bare_cancelled_becomes_dependency_unavailable():
    converted = from_rpc_error(rpc_error(grpc.StatusCode.CANCELLED), "executor")

    assert isinstance(converted, DependencyUnavailable)
    assert converted.reason == "EXECUTOR_UNAVAILABLE"


def test_every_status_has_exactly_one_error_info():
    errors: list[StrataError] = [
        RequestInvalid.field("a", "b"),
        RateLimited("x", retry_after_s=1.0),
        ModelNotFound("m"),
        DependencyUnavailable("redis"),
        DeadlineExceeded("late"),
    ]
    for error in errors:
        rich = decode(error.to_status())
        assert rich.code == error.code.value[0]
        assert unpack(rich, error_details_pb2.ErrorInfo).reason == error.reason
