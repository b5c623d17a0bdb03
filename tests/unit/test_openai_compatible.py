"""The OpenAI-compatible provider against an in-process `httpx.MockTransport` (no sockets)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc
import httpx
import pytest

from services.common.calls import Deadline
from services.common.catalog import (
    ModelConfig,
    OpenAICompatibleProviderConfig,
    OpenAIProviderConfig,
)
from services.common.chat import assemble_tool_calls
from services.common.errors import (
    BadUpstreamResponse,
    ContextLengthExceeded,
    ProviderAuthFailed,
    ProviderError,
    ProviderUnavailable,
    StreamInterrupted,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from services.common.settings import ConfigError
from services.executor import tokens
from services.executor.providers.base import (
    Accepted,
    Completion,
    Event,
    Finished,
    ProviderRequest,
    TextDelta,
    ToolCallPiece,
)
from services.executor.providers.openai import OpenAIProvider
from services.executor.providers.openai_compatible import OpenAICompatibleProvider
from strata.common.v1 import common_pb2

KEY_ENV = "STRATA_TEST_UPSTREAM_KEY"
API_KEY = "sk-test-9f2c41d7e0b8a6"
BASE_URL = "http://upstream.test/v1"
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8"}

Handler = Callable[[httpx.Request], httpx.Response]


# --- building requests and upstream answers ---------------------------------------------


def message(role: common_pb2.Role, content: str, **extra: Any) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=role, content=content, **extra)


def make_request(
    *,
    messages: Sequence[common_pb2.ChatMessage] = (),
    params: common_pb2.GenerationParams | None = None,
    max_output_tokens: int = 256,
    headers: dict[str, str] | None = None,
) -> ProviderRequest:
    return ProviderRequest(
        model=ModelConfig(
            name="small",
            provider="upstream",
            upstream_model="gpt-upstream-mini",
            headers=headers or {},
        ),
        messages=list(messages) or [message(common_pb2.ROLE_USER, "Say hello to Strata.")],
        params=params or common_pb2.GenerationParams(),
        max_output_tokens=max_output_tokens,
        deadline=Deadline.after(30),
        request_id="req-oai-1",
    )


def chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    role: str | None = None,
    model: str = "gpt-upstream-mini-2025-01-01",
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def usage_chunk(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "model": "gpt-upstream-mini-2025-01-01",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def sse(*events: dict[str, Any] | str, done: bool = True) -> bytes:
    """A text/event-stream body: one `data:` event per item, then `[DONE]` unless not done."""
    out = b""
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        out += b"data: " + data.encode() + b"\n\n"
    if done:
        out += b"data: [DONE]\n\n"
    return out


async def in_pieces(body: bytes, size: int = 7) -> AsyncIterator[bytes]:
    """The body in small arbitrary pieces, as a network would deliver it."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


async def then_raise(body: bytes, error: Exception) -> AsyncIterator[bytes]:
    yield body
    raise error


def sse_response(body: bytes) -> httpx.Response:
    return httpx.Response(200, headers=SSE_HEADERS, content=in_pieces(body))


def completion_body(
    text: str = "Hello, Strata!", finish: str = "stop", usage: bool = True
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "model": "gpt-upstream-mini-2025-01-01",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
            }
        ],
    }
    if usage:
        body["usage"] = {"prompt_tokens": 21, "completion_tokens": 4, "total_tokens": 25}
    return body


GREETING = sse(
    chunk("", role="assistant"),
    chunk("Hello"),
    chunk(","),
    chunk(" Strata"),
    chunk("!"),
    chunk(finish="stop"),
    usage_chunk(21, 4),
)


class Upstream:
    """Records every request and answers with `handler`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self.handler(request)

    @property
    def body(self) -> dict[str, Any]:
        assert len(self.requests) == 1
        body: dict[str, Any] = json.loads(self.requests[0].content)
        return body


def provider_config(**overrides: Any) -> OpenAICompatibleProviderConfig:
    fields: dict[str, Any] = {
        "kind": "openai_compatible",
        "base_url": BASE_URL,
        "api_key_env": KEY_ENV,
        "headers": {"x-provider-tag": "p-1"},
    }
    fields.update(overrides)
    return OpenAICompatibleProviderConfig(**fields)


@pytest.fixture
async def connect(monkeypatch):
    """Builds a provider whose upstream is `handler`; closes every provider afterwards."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    made: list[OpenAICompatibleProvider] = []

    def build(handler: Handler, **config: Any) -> tuple[OpenAICompatibleProvider, Upstream]:
        upstream = Upstream(handler)
        provider = OpenAICompatibleProvider(
            "upstream", provider_config(**config), transport=httpx.MockTransport(upstream)
        )
        made.append(provider)
        return provider, upstream

    yield build
    for provider in made:
        await provider.aclose()


async def collect(provider: OpenAICompatibleProvider, request: ProviderRequest) -> list[Event]:
    return [event async for event in provider.stream(request)]


async def drain(stream: AsyncIterator[Event], into: list[Event]) -> None:
    """Appends the stream's events to `into`, so they survive an error that ends it."""
    async for event in stream:
        into.append(event)


async def call(
    provider: OpenAICompatibleProvider, request: ProviderRequest, mode: str
) -> list[Event] | Completion:
    """Runs the request streamed or unary; the stream's events up to an error are lost."""
    if mode == "stream":
        return await collect(provider, request)
    return await provider.complete(request)


def text_of(events: Sequence[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


# --- the request sent upstream ----------------------------------------------------------


async def test_stream_body_maps_model_messages_and_limits(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    request = make_request(
        messages=[
            message(common_pb2.ROLE_SYSTEM, "Be brief."),
            message(common_pb2.ROLE_USER, "Weather?", name="alice"),
            message(common_pb2.ROLE_ASSISTANT, "Let me look."),
            message(common_pb2.ROLE_TOOL, '{"temp": 21}', tool_call_id="call_42"),
            message(common_pb2.ROLE_USER, "Thanks."),
        ],
        max_output_tokens=77,
    )

    await collect(provider, request)

    sent = upstream.requests[0]
    assert sent.method == "POST"
    assert sent.url == httpx.URL(f"{BASE_URL}/chat/completions")
    assert upstream.body == {
        "model": "gpt-upstream-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Weather?", "name": "alice"},
            {"role": "assistant", "content": "Let me look."},
            {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_42"},
            {"role": "user", "content": "Thanks."},
        ],
        "max_tokens": 77,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_sampling_params_are_sent_only_when_set_even_when_zero(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    params = common_pb2.GenerationParams(temperature=0.0, top_p=0.5, stop=["\n\n", "END"], seed=0)

    await collect(provider, make_request(params=params))

    body = upstream.body
    assert body["temperature"] == 0.0
    assert body["top_p"] == 0.5
    assert body["stop"] == ["\n\n", "END"]
    assert body["seed"] == 0


async def test_unset_sampling_params_are_left_out(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))

    await collect(provider, make_request(params=common_pb2.GenerationParams()))

    assert not {"temperature", "top_p", "stop", "seed"} & upstream.body.keys()


async def test_headers_carry_key_and_provider_and_model_extras(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))

    await collect(provider, make_request(headers={"x-model-route": "blue"}))

    headers = upstream.requests[0].headers
    assert headers["authorization"] == f"Bearer {API_KEY}"
    assert headers["x-provider-tag"] == "p-1"
    assert headers["x-model-route"] == "blue"
    assert headers["accept"] == "text/event-stream"


async def test_no_authorization_header_without_a_configured_key(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING), api_key_env=None)

    await collect(provider, make_request())

    assert "authorization" not in upstream.requests[0].headers


async def test_api_key_file_is_read_and_stripped(connect, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text("sk-from-file-123\n")
    provider, upstream = connect(
        lambda _: sse_response(GREETING), api_key_env=None, api_key_file=key_file
    )

    await collect(provider, make_request())

    assert upstream.requests[0].headers["authorization"] == "Bearer sk-from-file-123"


def test_missing_key_env_var_is_a_config_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)

    with pytest.raises(ConfigError, match=KEY_ENV):
        OpenAICompatibleProvider(
            "upstream",
            provider_config(),
            transport=httpx.MockTransport(lambda _: httpx.Response(500)),
        )


def test_empty_key_env_var_is_a_config_error(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "")

    with pytest.raises(ConfigError, match=KEY_ENV):
        OpenAICompatibleProvider(
            "upstream",
            provider_config(),
            transport=httpx.MockTransport(lambda _: httpx.Response(500)),
        )


# --- the streamed answer ------------------------------------------------------------------


async def test_stream_yields_accepted_deltas_in_order_then_finished_with_usage(connect):
    provider, _ = connect(lambda _: sse_response(GREETING))

    events = await collect(provider, make_request())

    assert events == [
        Accepted(),
        TextDelta("Hello"),
        TextDelta(","),
        TextDelta(" Strata"),
        TextDelta("!"),
        Finished(
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(input_tokens=21, output_tokens=4),
            provider_model="gpt-upstream-mini-2025-01-01",
        ),
    ]


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("stop", common_pb2.FINISH_REASON_STOP),
        ("length", common_pb2.FINISH_REASON_LENGTH),
        ("content_filter", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("tool_calls", common_pb2.FINISH_REASON_TOOL_CALLS),
    ],
)
async def test_stream_maps_the_finish_reason(connect, reason, expected):
    body = sse(chunk("Hi"), chunk(finish=reason), usage_chunk(5, 1))
    provider, _ = connect(lambda _: sse_response(body))

    events = await collect(provider, make_request())

    last = events[-1]
    assert isinstance(last, Finished)
    assert last.finish_reason == expected


async def test_stream_without_usage_estimates_it(connect):
    body = sse(chunk("Hello there, this is an answer."), chunk(finish="stop"))
    provider, _ = connect(lambda _: sse_response(body))
    request = make_request()

    events = await collect(provider, request)

    last = events[-1]
    assert isinstance(last, Finished)
    expected = tokens.estimate_usage(request.messages, "Hello there, this is an answer.")
    assert last.usage == expected
    assert last.usage.estimated
    assert last.usage.input_tokens > 0
    assert last.usage.output_tokens == 8


@pytest.mark.parametrize("done", [False, True], ids=["eof", "done-without-finish"])
async def test_stream_without_finish_reason_is_interrupted(connect, done):
    body = sse(chunk("Hello"), chunk(" there"), done=done)
    provider, _ = connect(lambda _: sse_response(body))
    events: list[Event] = []

    with pytest.raises(StreamInterrupted) as info:
        await drain(provider.stream(make_request()), events)

    assert events == [Accepted(), TextDelta("Hello"), TextDelta(" there")]
    assert info.value.reason == "STREAM_INTERRUPTED"


async def test_stream_event_that_is_not_json_is_a_protocol_error(connect):
    body = sse(chunk("Hello"), "{not json")
    provider, _ = connect(lambda _: sse_response(body))
    events: list[Event] = []

    with pytest.raises(BadUpstreamResponse) as info:
        await drain(provider.stream(make_request()), events)

    assert events == [Accepted(), TextDelta("Hello")]
    assert info.value.reason == "BAD_UPSTREAM_RESPONSE"


async def test_error_event_mid_stream_is_reported_as_interrupted(connect):
    error = {"error": {"message": "upstream overloaded: secret details", "code": "server_error"}}
    provider, _ = connect(lambda _: sse_response(sse(chunk("Hello"), error)))
    events: list[Event] = []

    with pytest.raises(ProviderError) as info:
        await drain(provider.stream(make_request()), events)

    assert events == [Accepted(), TextDelta("Hello")]
    assert info.value.reason == "STREAM_INTERRUPTED"
    assert "secret details" not in info.value.message


async def test_connection_lost_after_accept_is_interrupted(connect):
    # The finish reason arrived, but the usage chunk and [DONE] did not.
    received = sse(chunk("Hello"), chunk(finish="stop"), done=False)
    body = then_raise(received, httpx.ReadError("connection reset"))
    provider, _ = connect(lambda _: httpx.Response(200, headers=SSE_HEADERS, content=body))
    events: list[Event] = []

    with pytest.raises(StreamInterrupted) as info:
        await drain(provider.stream(make_request()), events)

    assert events == [Accepted(), TextDelta("Hello")]
    assert info.value.reason == "STREAM_INTERRUPTED"


async def test_read_timeout_mid_stream_is_an_interrupted_stream(connect):
    received = sse(chunk("Hello"), chunk(finish="stop"), done=False)
    body = then_raise(received, httpx.ReadTimeout("stalled"))
    provider, _ = connect(lambda _: httpx.Response(200, headers=SSE_HEADERS, content=body))

    with pytest.raises(StreamInterrupted):
        await collect(provider, make_request())


async def test_stream_chunk_with_a_bad_delta_is_a_protocol_error(connect):
    body = sse({"model": "m", "choices": [{"index": 0, "delta": "Hello"}]})
    provider, _ = connect(lambda _: sse_response(body))

    with pytest.raises(BadUpstreamResponse):
        await collect(provider, make_request())


async def test_stream_leaves_model_headers_untouched(connect):
    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["stream"]:
            return sse_response(GREETING)
        return httpx.Response(200, json=completion_body())

    provider, upstream = connect(answer)
    request = make_request(headers={"x-model-route": "blue"})

    await collect(provider, request)
    await provider.complete(request)

    assert request.model.headers == {"x-model-route": "blue"}
    assert upstream.requests[1].headers["accept"] != "text/event-stream"


# --- HTTP errors, for both calls -----------------------------------------------------------


MODES = ["stream", "complete"]


def json_response(status: int, body: dict[str, Any], **headers: str) -> Handler:
    return lambda _: httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize("mode", MODES)
async def test_429_with_retry_after_is_rate_limited(connect, mode):
    provider, _ = connect(
        json_response(429, {"error": {"code": "rate_limit_exceeded"}}, **{"retry-after": "3"})
    )

    with pytest.raises(UpstreamRateLimited) as info:
        await call(provider, make_request(), mode)

    assert info.value.retry_after_s == 3
    assert info.value.reason == "UPSTREAM_RATE_LIMITED"
    assert info.value.metadata["http_status"] == "429"


@pytest.mark.parametrize("mode", MODES)
async def test_429_insufficient_quota_is_quota_exhausted_without_retry_delay(connect, mode):
    body = {"error": {"type": "insufficient_quota", "code": "insufficient_quota"}}
    provider, _ = connect(json_response(429, body, **{"retry-after": "20"}))

    with pytest.raises(UpstreamQuotaExhausted) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "UPSTREAM_QUOTA_EXHAUSTED"
    assert not info.value.retryable
    assert info.value.details() == []
    assert "retry_after_ms" not in info.value.metadata


@pytest.mark.parametrize("mode", MODES)
async def test_500_is_provider_unavailable(connect, mode):
    provider, _ = connect(json_response(500, {"error": {"message": "boom"}}))

    with pytest.raises(ProviderUnavailable) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "PROVIDER_UNAVAILABLE"
    assert info.value.metadata["http_status"] == "500"


@pytest.mark.parametrize("mode", MODES)
async def test_400_context_length_is_its_own_reason_without_the_provider_message(connect, mode):
    body = {"error": {"code": "context_length_exceeded", "message": "secret details"}}
    provider, _ = connect(json_response(400, body))

    with pytest.raises(ContextLengthExceeded) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "CONTEXT_LENGTH_EXCEEDED"
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "context_length_exceeded" in info.value.message
    assert "secret details" not in str(info.value)
    assert "secret details" not in " ".join(info.value.metadata.values())


@pytest.mark.parametrize("mode", MODES)
async def test_401_is_auth_failed(connect, mode):
    provider, _ = connect(json_response(401, {"error": {"code": "invalid_api_key"}}))

    with pytest.raises(ProviderAuthFailed) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "PROVIDER_AUTH_FAILED"
    assert not info.value.retryable


async def test_http_error_on_stream_yields_nothing_before_raising(connect):
    provider, _ = connect(json_response(500, {"error": {"message": "boom"}}))
    events: list[Event] = []

    with pytest.raises(ProviderUnavailable):
        await drain(provider.stream(make_request()), events)

    assert events == []


def raising(error: Exception) -> Handler:
    def handler(request: httpx.Request) -> httpx.Response:
        raise error

    return handler


@pytest.mark.parametrize("mode", MODES)
async def test_connect_error_is_provider_unavailable(connect, mode):
    provider, _ = connect(raising(httpx.ConnectError("connection refused")))

    with pytest.raises(ProviderUnavailable) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "PROVIDER_UNAVAILABLE"


@pytest.mark.parametrize("mode", MODES)
async def test_read_timeout_is_provider_timeout(connect, mode):
    provider, _ = connect(raising(httpx.ReadTimeout("timed out")))

    with pytest.raises(UpstreamTimeout) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "UPSTREAM_TIMEOUT"


# --- the unary answer ---------------------------------------------------------------------


async def test_complete_sends_a_unary_body_and_parses_the_answer(connect):
    provider, upstream = connect(lambda _: httpx.Response(200, json=completion_body()))

    completion = await provider.complete(make_request(max_output_tokens=64))

    assert completion == Completion(
        text="Hello, Strata!",
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(input_tokens=21, output_tokens=4),
        provider_model="gpt-upstream-mini-2025-01-01",
    )
    body = upstream.body
    assert body["stream"] is False
    assert "stream_options" not in body
    assert body["model"] == "gpt-upstream-mini"
    assert body["max_tokens"] == 64
    assert upstream.requests[0].headers["authorization"] == f"Bearer {API_KEY}"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("length", common_pb2.FINISH_REASON_LENGTH),
        ("content_filter", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("tool_calls", common_pb2.FINISH_REASON_TOOL_CALLS),
    ],
)
async def test_complete_maps_the_finish_reason(connect, reason, expected):
    provider, _ = connect(lambda _: httpx.Response(200, json=completion_body(finish=reason)))

    completion = await provider.complete(make_request())

    assert completion.finish_reason == expected


async def test_complete_without_usage_estimates_it(connect):
    provider, _ = connect(lambda _: httpx.Response(200, json=completion_body(usage=False)))
    request = make_request()

    completion = await provider.complete(request)

    assert completion.usage == tokens.estimate_usage(request.messages, completion.text)
    assert completion.usage.estimated


@pytest.mark.parametrize(
    "content",
    [b"<html>gateway</html>", b'{"choices": []}', b'{"object": "chat.completion"}'],
    ids=["not-json", "no-choices", "missing-choices"],
)
async def test_complete_unreadable_answer_is_a_protocol_error(connect, content):
    provider, _ = connect(lambda _: httpx.Response(200, content=content))

    with pytest.raises(BadUpstreamResponse):
        await provider.complete(make_request())


# --- the API key never leaks -----------------------------------------------------------------


LEAKY_UPSTREAMS: dict[str, Handler] = {
    "401-echoing-key": json_response(
        401,
        {
            "error": {
                "message": f"Incorrect API key provided: {API_KEY}.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        },
    ),
    "429": json_response(429, {"error": {"message": f"key {API_KEY} is throttled"}}),
    "400": json_response(400, {"error": {"message": f"bad request for {API_KEY}"}}),
    "500": json_response(500, {"error": {"message": f"crash handling {API_KEY}"}}),
    "connect-error": raising(httpx.ConnectError("connection refused")),
    "read-timeout": raising(httpx.ReadTimeout("timed out")),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("upstream", list(LEAKY_UPSTREAMS))
async def test_api_key_never_appears_in_errors(connect, mode, upstream):
    provider, _ = connect(LEAKY_UPSTREAMS[upstream])

    with pytest.raises(ProviderError) as info:
        await call(provider, make_request(), mode)

    error = info.value
    assert API_KEY not in str(error)
    assert API_KEY not in repr(error)
    assert API_KEY not in " ".join(error.metadata.values())
    status = error.to_status()
    assert API_KEY not in status.details
    assert all(API_KEY.encode() not in bytes(value) for _, value in status.trailing_metadata)


async def test_api_key_never_appears_in_mid_stream_errors(connect):
    leaky = {"error": {"message": f"key {API_KEY} revoked", "code": "invalid_api_key"}}
    provider, _ = connect(lambda _: sse_response(sse(chunk("Hi"), leaky)))

    with pytest.raises(ProviderError) as info:
        await collect(provider, make_request())

    assert API_KEY not in str(info.value)
    assert API_KEY not in " ".join(info.value.metadata.values())


# --- tools, formats, embeddings, OpenAI's own API --------------------------------------------


TOOLS_PARAMS = common_pb2.GenerationParams(
    tools=[
        common_pb2.Tool(
            name="lookup_order",
            description="Finds an order",
            parameters_json='{"type": "object", "properties": {"id": {"type": "string"}}}',
        )
    ],
    tool_choice=common_pb2.ToolChoice(
        mode=common_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="lookup_order"
    ),
    response_format=common_pb2.ResponseFormat(
        type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
        schema_name="answer",
        json_schema='{"type": "object"}',
        strict=True,
    ),
)


async def test_tools_choice_and_schema_are_passed_through(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    call = common_pb2.ToolCall(id="call_1", name="lookup_order", arguments_json='{"id": "7"}')
    history = [
        message(common_pb2.ROLE_USER, "Where is order 7?"),
        common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, tool_call_id="call_1", content="shipped"),
    ]
    await collect(provider, make_request(messages=history, params=TOOLS_PARAMS))
    body = upstream.body
    assert body["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "lookup_order",
                "description": "Finds an order",
                "parameters": {"type": "object", "properties": {"id": {"type": "string"}}},
            },
        }
    ]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "lookup_order"}}
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": True},
    }
    assert body["messages"][1] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "lookup_order", "arguments": '{"id": "7"}'},
            }
        ],
    }
    assert body["messages"][2] == {"role": "tool", "content": "shipped", "tool_call_id": "call_1"}


def tool_chunk(index: int, arguments: str, call_id: str = "", name: str = "") -> dict[str, Any]:
    function: dict[str, Any] = {"arguments": arguments}
    if name:
        function["name"] = name
    call: dict[str, Any] = {"index": index, "function": function}
    if call_id:
        call.update(id=call_id, type="function")
    return {"model": "m", "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]}


async def test_streamed_tool_calls_become_pieces(connect):
    body = sse(
        tool_chunk(0, "", "call_a", "lookup_order"),
        tool_chunk(0, '{"id": '),
        tool_chunk(0, '"7"}'),
        tool_chunk(1, "{}", "call_b", "ping"),
        chunk(finish="tool_calls"),
        usage_chunk(12, 9),
    )
    provider, _ = connect(lambda _: sse_response(body))
    events = await collect(provider, make_request(params=TOOLS_PARAMS))
    pieces = [e.delta for e in events if isinstance(e, ToolCallPiece)]
    calls = assemble_tool_calls(pieces)
    assert [(c.id, c.name, c.arguments_json) for c in calls] == [
        ("call_a", "lookup_order", '{"id": "7"}'),
        ("call_b", "ping", "{}"),
    ]
    last = events[-1]
    assert isinstance(last, Finished)
    assert last.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


async def test_unary_tool_calls_are_parsed(connect):
    answer = completion_body(text="", finish="tool_calls")
    answer["choices"][0]["message"]["tool_calls"] = [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    ]
    provider, _ = connect(lambda _: httpx.Response(200, json=answer))
    completion = await provider.complete(make_request(params=TOOLS_PARAMS))
    assert [(c.id, c.name) for c in completion.tool_calls] == [("call_a", "f")]
    assert completion.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS


async def test_embeddings_are_returned_in_input_order(connect):
    answer = {
        "data": [{"index": 1, "embedding": [0.0, 1.0]}, {"index": 0, "embedding": [1.0, 0.0]}],
        "usage": {"prompt_tokens": 5},
    }
    provider, upstream = connect(lambda _: httpx.Response(200, json=answer))
    model = ModelConfig(
        name="vec", provider="upstream", upstream_model="embed-1", kind="embedding", dimensions=2
    )
    result = await provider.embed(model, ["first", "second"], Deadline.after(5))
    assert result.vectors == [[1.0, 0.0], [0.0, 1.0]]
    assert result.usage == common_pb2.Usage(input_tokens=5)
    assert upstream.requests[0].url.path.endswith("/embeddings")
    assert upstream.body == {
        "model": "embed-1",
        "input": ["first", "second"],
        "encoding_format": "float",
        "dimensions": 2,
    }


async def test_embeddings_of_the_wrong_count_are_a_bad_response(connect):
    answer = {"data": [{"index": 0, "embedding": [1.0]}]}
    provider, _ = connect(lambda _: httpx.Response(200, json=answer))
    model = ModelConfig(name="vec", provider="upstream", upstream_model="e", kind="embedding")
    with pytest.raises(BadUpstreamResponse):
        await provider.embed(model, ["a", "b"], Deadline.after(5))


async def test_openai_uses_max_completion_tokens_and_the_organization(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    upstream = Upstream(lambda _: sse_response(GREETING))
    config = OpenAIProviderConfig(kind="openai", organization="org-strata")
    provider = OpenAIProvider("openai", config, transport=httpx.MockTransport(upstream))
    try:
        await collect(provider, make_request(max_output_tokens=77))
    finally:
        await provider.aclose()
    request = upstream.requests[0]
    assert str(request.url) == "https://api.openai.com/v1/chat/completions"
    assert request.headers["openai-organization"] == "org-strata"
    assert request.headers["authorization"] == f"Bearer {API_KEY}"
    assert upstream.body["max_completion_tokens"] == 77
    assert "max_tokens" not in upstream.body


async def test_a_503_with_retry_after_asks_for_that_pause(connect):
    provider, _ = connect(
        json_response(503, {"error": {"type": "overloaded"}}, **{"retry-after": "4"})
    )
    with pytest.raises(ProviderUnavailable) as info:
        await provider.complete(make_request())
    assert info.value.retryable
    assert info.value.retry_after_s == 4


async def test_a_credit_balance_message_is_quota_exhausted(connect):
    body = {"error": {"type": "invalid_request_error", "message": "Your credit balance is too low"}}
    provider, _ = connect(json_response(400, body))
    with pytest.raises(UpstreamQuotaExhausted):
        await provider.complete(make_request())
