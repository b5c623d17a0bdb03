"""The Anthropic provider against an in-process `httpx.MockTransport` (no sockets).

Upstream bodies follow the shapes Anthropic's Messages API sends: named server-sent events
(`event:` lines, JSON data carrying the same `type`) and `{"type": "error", "error": {...}}`
error bodies.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pytest

from services.common.calls import Deadline
from services.common.catalog import AnthropicProviderConfig, ModelConfig
from services.common.chat import assemble_tool_calls
from services.common.errors import (
    BadUpstreamResponse,
    ContextLengthExceeded,
    ProviderAuthFailed,
    ProviderError,
    ProviderUnavailable,
    StreamInterrupted,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from services.common.settings import ConfigError
from services.executor.providers.anthropic import (
    JSON_INSTRUCTION,
    SCHEMA_INSTRUCTION,
    AnthropicProvider,
)
from services.executor.providers.base import (
    Accepted,
    Completion,
    Event,
    Finished,
    ProviderRequest,
    TextDelta,
    ToolCallPiece,
)
from strata.common.v1 import common_pb2

KEY_ENV = "STRATA_TEST_ANTHROPIC_KEY"
API_KEY = "sk-ant-api03-test-5b7e19c4d2a8f0"
BASE_URL = "http://anthropic.test/v1"
UPSTREAM_MODEL = "claude-sonnet-4-5"
SNAPSHOT = "claude-sonnet-4-5-20250929"
SSE_HEADERS = {"content-type": "text/event-stream; charset=utf-8"}

Handler = Callable[[httpx.Request], httpx.Response]
SseEvent = tuple[str, dict[str, Any] | str]


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
            name="claude",
            provider="anthropic",
            upstream_model=UPSTREAM_MODEL,
            headers=headers or {},
        ),
        messages=list(messages) or [message(common_pb2.ROLE_USER, "Say hello to Strata.")],
        params=params or common_pb2.GenerationParams(),
        max_output_tokens=max_output_tokens,
        deadline=Deadline.after(30),
        request_id="req-ant-1",
    )


def message_start(input_tokens: int | None = 25, **usage: int) -> SseEvent:
    counts: dict[str, int] = {"output_tokens": 1, **usage}
    if input_tokens is not None:
        counts["input_tokens"] = input_tokens
    return (
        "message_start",
        {
            "type": "message_start",
            "message": {
                "id": "msg_01XFDUDYJgAACzvnptvVoYEL",
                "type": "message",
                "role": "assistant",
                "content": [],
                "model": SNAPSHOT,
                "stop_reason": None,
                "stop_sequence": None,
                "usage": counts,
            },
        },
    )


def text_block(index: int, *pieces: str) -> list[SseEvent]:
    return [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        *(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
            for piece in pieces
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def tool_block(index: int, call_id: str, name: str, *partials: str) -> list[SseEvent]:
    return [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": index,
                "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}},
            },
        ),
        *(
            (
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": index,
                    "delta": {"type": "input_json_delta", "partial_json": partial},
                },
            )
            for partial in partials
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": index}),
    ]


def message_delta(stop_reason: str | None = "end_turn", output_tokens: int | None = 12) -> SseEvent:
    usage = {} if output_tokens is None else {"output_tokens": output_tokens}
    return (
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": usage,
        },
    )


MESSAGE_STOP: SseEvent = ("message_stop", {"type": "message_stop"})
PING: SseEvent = ("ping", {"type": "ping"})


def sse(*events: SseEvent | list[SseEvent]) -> bytes:
    """A text/event-stream body, one named event per item (lists are flattened)."""
    out = b""
    flat: list[SseEvent] = []
    for item in events:
        flat.extend(item if isinstance(item, list) else [item])
    for name, data in flat:
        text = data if isinstance(data, str) else json.dumps(data)
        out += f"event: {name}\ndata: {text}\n\n".encode()
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


GREETING = sse(
    message_start(25),
    PING,
    text_block(0, "Hello", ", Strata", "!"),
    message_delta("end_turn", 12),
    MESSAGE_STOP,
)

WEATHER_CALLS = sse(
    message_start(380),
    text_block(0, "Let me check both cities."),
    tool_block(1, "toolu_01A09q90qw90lq917835lq9", "get_weather", "", '{"city": ', '"Par', 'is"}'),
    tool_block(2, "toolu_01B7c2Lq0xZ9mVq3hTn4pR8s", "get_weather", '{"city":"Berlin"', "}"),
    tool_block(3, "toolu_01C5dkW2s8YhQ1pN6vE0aJ3t", "get_time", ""),
    message_delta("tool_use", 94),
    MESSAGE_STOP,
)


def message_body(
    content: list[dict[str, Any]] | None = None,
    stop_reason: str | None = "end_turn",
    usage: dict[str, int] | None = None,
) -> dict[str, Any]:
    return {
        "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF",
        "type": "message",
        "role": "assistant",
        "model": SNAPSHOT,
        "content": [{"type": "text", "text": "Hello, Strata!"}] if content is None else content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": 21, "output_tokens": 4} if usage is None else usage,
    }


def error_body(kind: str, text: str) -> dict[str, Any]:
    return {
        "type": "error",
        "error": {"type": kind, "message": text},
        "request_id": "req_011CSHoEeqs5C35K2UUqR7Fy",
    }


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


def provider_config(**overrides: Any) -> AnthropicProviderConfig:
    fields: dict[str, Any] = {
        "kind": "anthropic",
        "base_url": BASE_URL,
        "api_key_env": KEY_ENV,
        "headers": {"x-provider-tag": "p-1"},
    }
    fields.update(overrides)
    return AnthropicProviderConfig(**fields)


@pytest.fixture
async def connect(monkeypatch):
    """Builds a provider whose upstream is `handler`; closes every provider afterwards."""
    monkeypatch.setenv(KEY_ENV, API_KEY)
    made: list[AnthropicProvider] = []

    def build(handler: Handler, **config: Any) -> tuple[AnthropicProvider, Upstream]:
        upstream = Upstream(handler)
        provider = AnthropicProvider(
            "anthropic", provider_config(**config), transport=httpx.MockTransport(upstream)
        )
        made.append(provider)
        return provider, upstream

    yield build
    for provider in made:
        await provider.aclose()


async def collect(provider: AnthropicProvider, request: ProviderRequest) -> list[Event]:
    return [event async for event in provider.stream(request)]


async def drain(stream: AsyncIterator[Event], into: list[Event]) -> None:
    """Appends the stream's events to `into`, so they survive an error that ends it."""
    async for event in stream:
        into.append(event)


async def call(
    provider: AnthropicProvider, request: ProviderRequest, mode: str
) -> list[Event] | Completion:
    if mode == "stream":
        return await collect(provider, request)
    return await provider.complete(request)


def text_of(events: Sequence[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def pieces_of(events: Sequence[Event]) -> list[common_pb2.ToolCallDelta]:
    return [e.delta for e in events if isinstance(e, ToolCallPiece)]


def finished(events: Sequence[Event]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished)
    return last


# --- the request sent upstream ----------------------------------------------------------


async def test_stream_body_maps_a_conversation_with_tool_calls(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    weather = common_pb2.ToolCall(
        id="toolu_01A", name="get_weather", arguments_json='{"city": "Paris"}'
    )
    clock = common_pb2.ToolCall(id="toolu_01B", name="get_time", arguments_json="")
    request = make_request(
        messages=[
            message(common_pb2.ROLE_SYSTEM, "Be brief."),
            message(common_pb2.ROLE_USER, "Weather in Paris?", name="alice"),
            message(common_pb2.ROLE_ASSISTANT, "Let me look.", tool_calls=[weather, clock]),
            message(common_pb2.ROLE_TOOL, '{"temp": 21}', tool_call_id="toolu_01A"),
            message(common_pb2.ROLE_TOOL, "14:05", tool_call_id="toolu_01B"),
            message(common_pb2.ROLE_USER, "Thanks. And tomorrow?"),
            message(common_pb2.ROLE_SYSTEM, "Answer in French."),
            message(common_pb2.ROLE_ASSISTANT, "", tool_calls=[weather]),
        ],
        max_output_tokens=77,
    )

    await collect(provider, request)

    sent = upstream.requests[0]
    assert sent.method == "POST"
    assert sent.url == httpx.URL(f"{BASE_URL}/messages")
    assert upstream.body == {
        "model": UPSTREAM_MODEL,
        "max_tokens": 77,
        "system": "Be brief.\n\nAnswer in French.",
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Let me look."},
                    {
                        "type": "tool_use",
                        "id": "toolu_01A",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    },
                    {"type": "tool_use", "id": "toolu_01B", "name": "get_time", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A", "content": '{"temp": 21}'},
                    {"type": "tool_result", "tool_use_id": "toolu_01B", "content": "14:05"},
                    {"type": "text", "text": "Thanks. And tomorrow?"},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_01A",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
        ],
        "stream": True,
    }


async def test_consecutive_messages_of_one_role_are_merged(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    request = make_request(
        messages=[
            message(common_pb2.ROLE_USER, "First."),
            message(common_pb2.ROLE_USER, "Second."),
            message(common_pb2.ROLE_ASSISTANT, "One."),
            message(common_pb2.ROLE_ASSISTANT, ""),  # says nothing: dropped
            message(common_pb2.ROLE_ASSISTANT, "Two."),
            message(common_pb2.ROLE_USER, "Third."),
        ]
    )

    await collect(provider, request)

    assert upstream.body["messages"] == [
        {
            "role": "user",
            "content": [{"type": "text", "text": "First."}, {"type": "text", "text": "Second."}],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
        },
        {"role": "user", "content": "Third."},
    ]
    assert "system" not in upstream.body


async def test_tool_results_open_the_user_turn_they_are_merged_into(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    call_ = common_pb2.ToolCall(id="toolu_01A", name="lookup", arguments_json="{}")
    request = make_request(
        messages=[
            message(common_pb2.ROLE_USER, "Look it up."),
            message(common_pb2.ROLE_ASSISTANT, "", tool_calls=[call_]),
            message(common_pb2.ROLE_USER, "Quickly, please."),
            message(common_pb2.ROLE_TOOL, "found", tool_call_id="toolu_01A"),
        ]
    )

    await collect(provider, request)

    assert upstream.body["messages"][-1] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_01A", "content": "found"},
            {"type": "text", "text": "Quickly, please."},
        ],
    }


async def test_tool_call_arguments_that_are_not_an_object_are_rejected_unsent(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    bad = common_pb2.ToolCall(id="toolu_01A", name="lookup", arguments_json="[1, 2")
    request = make_request(
        messages=[
            message(common_pb2.ROLE_USER, "Look it up."),
            message(common_pb2.ROLE_ASSISTANT, "", tool_calls=[bad]),
        ]
    )

    with pytest.raises(UpstreamRejected) as info:
        await collect(provider, request)

    assert "[1, 2" not in info.value.message
    assert upstream.requests == []


async def test_sampling_params_are_sent_only_when_set_and_seed_never(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    params = common_pb2.GenerationParams(temperature=0.0, top_p=0.5, stop=["\n\nHuman:"], seed=7)

    await collect(provider, make_request(params=params))

    body = upstream.body
    assert body["temperature"] == 0.0
    assert body["top_p"] == 0.5
    assert body["stop_sequences"] == ["\n\nHuman:"]
    assert not {"seed", "stop"} & body.keys()


async def test_unset_params_are_left_out(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))

    await collect(provider, make_request(params=common_pb2.GenerationParams(seed=3)))

    assert (
        not {
            "temperature",
            "top_p",
            "stop_sequences",
            "seed",
            "tools",
            "tool_choice",
            "system",
        }
        & upstream.body.keys()
    )


def with_tools(mode: common_pb2.ToolChoiceMode, function: str = "") -> common_pb2.GenerationParams:
    return common_pb2.GenerationParams(
        tools=[
            common_pb2.Tool(
                name="get_weather",
                description="Current weather in a city.",
                parameters_json=(
                    '{"type": "object", "properties": {"city": {"type": "string"}},'
                    ' "required": ["city"]}'
                ),
            ),
            common_pb2.Tool(name="get_time"),
        ],
        tool_choice=common_pb2.ToolChoice(mode=mode, function_name=function),
    )


async def test_tools_take_anthropics_shape(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))

    await collect(provider, make_request(params=with_tools(common_pb2.TOOL_CHOICE_MODE_AUTO)))

    assert upstream.body["tools"] == [
        {
            "name": "get_weather",
            "description": "Current weather in a city.",
            "input_schema": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
        {"name": "get_time", "input_schema": {"type": "object"}},
    ]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (common_pb2.TOOL_CHOICE_MODE_AUTO, {"type": "auto"}),
        (common_pb2.TOOL_CHOICE_MODE_REQUIRED, {"type": "any"}),
        (common_pb2.TOOL_CHOICE_MODE_NONE, {"type": "none"}),
        (common_pb2.TOOL_CHOICE_MODE_FUNCTION, {"type": "tool", "name": "get_time"}),
        (common_pb2.TOOL_CHOICE_MODE_UNSPECIFIED, None),
    ],
    ids=["auto", "required", "none", "function", "unspecified"],
)
async def test_tool_choice_is_mapped(connect, mode, expected):
    provider, upstream = connect(lambda _: sse_response(GREETING))

    await collect(provider, make_request(params=with_tools(mode, function="get_time")))

    assert upstream.body.get("tool_choice") == expected


async def test_tool_choice_none_without_tools_sends_neither(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    params = common_pb2.GenerationParams(
        tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_NONE)
    )

    await collect(provider, make_request(params=params))

    assert not {"tools", "tool_choice"} & upstream.body.keys()


async def test_json_object_format_is_asked_for_in_the_system_prompt(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    params = common_pb2.GenerationParams(
        response_format=common_pb2.ResponseFormat(type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    )
    request = make_request(
        messages=[
            message(common_pb2.ROLE_SYSTEM, "Be brief."),
            message(common_pb2.ROLE_USER, "List 3 colours."),
        ],
        params=params,
    )

    await collect(provider, request)

    assert upstream.body["system"] == f"Be brief.\n\n{JSON_INSTRUCTION}"
    assert "response_format" not in upstream.body


async def test_json_schema_format_puts_the_schema_in_the_system_prompt(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    schema = '{"type": "object", "properties": {"colours": {"type": "array"}}}'
    params = common_pb2.GenerationParams(
        response_format=common_pb2.ResponseFormat(
            type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            schema_name="colours",
            json_schema=schema,
        )
    )

    await collect(provider, make_request(params=params))

    system = upstream.body["system"]
    assert system.startswith(JSON_INSTRUCTION)
    assert system.endswith(f"{SCHEMA_INSTRUCTION}{schema}")


async def test_text_format_adds_nothing(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING))
    params = common_pb2.GenerationParams(
        response_format=common_pb2.ResponseFormat(type=common_pb2.RESPONSE_FORMAT_TYPE_TEXT)
    )

    await collect(provider, make_request(params=params))

    assert "system" not in upstream.body


async def test_headers_carry_key_version_and_provider_and_model_extras(connect):
    provider, upstream = connect(lambda _: sse_response(GREETING), api_version="2024-10-22")

    await collect(provider, make_request(headers={"x-model-route": "blue"}))

    headers = upstream.requests[0].headers
    assert headers["x-api-key"] == API_KEY
    assert headers["anthropic-version"] == "2024-10-22"
    assert headers["x-provider-tag"] == "p-1"
    assert headers["x-model-route"] == "blue"
    assert headers["accept"] == "text/event-stream"
    assert "authorization" not in headers


async def test_default_config_speaks_to_anthropic_with_the_pinned_version(monkeypatch):
    monkeypatch.setenv("ANTHROPIC_API_KEY", API_KEY)
    upstream = Upstream(lambda _: sse_response(GREETING))
    provider = AnthropicProvider(
        "anthropic",
        AnthropicProviderConfig(kind="anthropic"),
        transport=httpx.MockTransport(upstream),
    )
    try:
        await collect(provider, make_request())
    finally:
        await provider.aclose()

    assert upstream.requests[0].url == httpx.URL("https://api.anthropic.com/v1/messages")
    assert upstream.requests[0].headers["anthropic-version"] == "2023-06-01"


async def test_missing_key_is_a_config_error(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)

    with pytest.raises(ConfigError, match=KEY_ENV):
        AnthropicProvider("anthropic", provider_config())


async def test_stream_leaves_model_headers_untouched(connect):
    def answer(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content)["stream"]:
            return sse_response(GREETING)
        return httpx.Response(200, json=message_body())

    provider, upstream = connect(answer)
    request = make_request(headers={"x-model-route": "blue"})

    await collect(provider, request)
    await provider.complete(request)

    assert request.model.headers == {"x-model-route": "blue"}
    assert upstream.requests[1].headers["accept"] != "text/event-stream"
    assert json.loads(upstream.requests[1].content)["stream"] is False


# --- the streamed answer ----------------------------------------------------------------


async def test_streamed_text_answer(connect):
    provider, _ = connect(lambda _: sse_response(GREETING))

    events = await collect(provider, make_request())

    assert events == [
        Accepted(),
        TextDelta("Hello"),
        TextDelta(", Strata"),
        TextDelta("!"),
        Finished(
            finish_reason=common_pb2.FINISH_REASON_STOP,
            usage=common_pb2.Usage(input_tokens=25, output_tokens=12),
            provider_model=SNAPSHOT,
        ),
    ]


async def test_accepted_comes_as_soon_as_the_headers_arrive(connect):
    provider, _ = connect(lambda _: sse_response(GREETING))
    stream = provider.stream(make_request())

    first = await anext(stream)
    await stream.aclose()

    assert first == Accepted()


async def test_usage_counts_cached_input_and_the_last_message_delta(connect):
    body = sse(
        message_start(5, cache_creation_input_tokens=1200, cache_read_input_tokens=300),
        text_block(0, "Hi"),
        message_delta(None, 3),
        message_delta("end_turn", 9),
        MESSAGE_STOP,
    )
    provider, _ = connect(lambda _: sse_response(body))

    events = await collect(provider, make_request())

    assert finished(events).usage == common_pb2.Usage(input_tokens=1505, output_tokens=9)


async def test_input_count_repeated_in_message_delta_wins(connect):
    # Newer API versions repeat the (cumulative) input count in message_delta.
    delta = message_delta("end_turn", 9)
    assert isinstance(delta[1], dict)
    delta[1]["usage"].update(input_tokens=30, cache_read_input_tokens=100)
    body = sse(message_start(25), text_block(0, "Hi"), delta, MESSAGE_STOP)
    provider, _ = connect(lambda _: sse_response(body))

    events = await collect(provider, make_request())

    assert finished(events).usage == common_pb2.Usage(input_tokens=130, output_tokens=9)


async def test_missing_usage_is_estimated(connect):
    body = sse(
        message_start(None),
        text_block(0, "Hello there"),
        message_delta("end_turn", None),
        MESSAGE_STOP,
    )
    provider, _ = connect(lambda _: sse_response(body))

    events = await collect(provider, make_request())

    usage = finished(events).usage
    assert usage.estimated
    assert usage.input_tokens > 0
    assert usage.output_tokens == 2


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("end_turn", common_pb2.FINISH_REASON_STOP),
        ("stop_sequence", common_pb2.FINISH_REASON_STOP),
        ("max_tokens", common_pb2.FINISH_REASON_LENGTH),
        ("tool_use", common_pb2.FINISH_REASON_TOOL_CALLS),
        ("refusal", common_pb2.FINISH_REASON_CONTENT_FILTER),
        ("pause_turn", common_pb2.FINISH_REASON_STOP),
        ("model_context_window_exceeded", common_pb2.FINISH_REASON_LENGTH),
        ("a_reason_from_the_future", common_pb2.FINISH_REASON_STOP),
    ],
)
@pytest.mark.parametrize("mode", ["stream", "complete"])
async def test_stop_reasons_are_mapped(connect, mode, reason, expected):
    def answer(request: httpx.Request) -> httpx.Response:
        if mode == "stream":
            return sse_response(
                sse(message_start(), text_block(0, "Hi"), message_delta(reason), MESSAGE_STOP)
            )
        return httpx.Response(200, json=message_body(stop_reason=reason))

    provider, _ = connect(answer)

    result = await call(provider, make_request(), mode)

    if isinstance(result, Completion):
        assert result.finish_reason == expected
    else:
        assert finished(result).finish_reason == expected


async def test_streamed_tool_calls(connect):
    provider, _ = connect(lambda _: sse_response(WEATHER_CALLS))

    events = await collect(
        provider, make_request(params=with_tools(common_pb2.TOOL_CHOICE_MODE_AUTO))
    )

    assert events[0] == Accepted()
    assert text_of(events) == "Let me check both cities."
    pieces = pieces_of(events)
    assert [(p.index, p.id, p.name) for p in pieces if p.id] == [
        (0, "toolu_01A09q90qw90lq917835lq9", "get_weather"),
        (1, "toolu_01B7c2Lq0xZ9mVq3hTn4pR8s", "get_weather"),
        (2, "toolu_01C5dkW2s8YhQ1pN6vE0aJ3t", "get_time"),
    ]
    assert all(not p.arguments_json for p in pieces if p.id)
    assert all(not p.id and not p.name for p in pieces if p.arguments_json)
    calls = assemble_tool_calls(pieces)
    assert [(c.name, json.loads(c.arguments_json)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Berlin"}),
        ("get_time", {}),
    ]
    done = finished(events)
    assert done.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert done.usage == common_pb2.Usage(input_tokens=380, output_tokens=94)


async def test_tool_call_pieces_arrive_in_stream_order(connect):
    provider, _ = connect(lambda _: sse_response(WEATHER_CALLS))

    events = await collect(provider, make_request())

    paris = [p.arguments_json for p in pieces_of(events) if p.index == 0]
    assert paris == ["", '{"city": ', '"Par', 'is"}']


async def test_thinking_blocks_and_pings_are_not_part_of_the_answer(connect):
    thinking: list[SseEvent] = [
        (
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": "", "signature": ""},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "The user greets me."},
            },
        ),
        (
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"},
            },
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
    ]
    body = sse(
        PING,
        message_start(),
        PING,
        thinking,
        text_block(1, "Hello"),
        PING,
        message_delta(),
        MESSAGE_STOP,
    )
    provider, _ = connect(lambda _: sse_response(body))

    events = await collect(provider, make_request())

    assert events[:2] == [Accepted(), TextDelta("Hello")]
    assert len(events) == 3
    assert pieces_of(events) == []


async def test_unknown_event_types_are_ignored(connect):
    body = sse(
        message_start(),
        ("future_event", {"type": "future_event", "detail": {"x": 1}}),
        text_block(0, "Hi"),
        message_delta(),
        MESSAGE_STOP,
    )
    provider, _ = connect(lambda _: sse_response(body))

    events = await collect(provider, make_request())

    assert text_of(events) == "Hi"
    assert isinstance(events[-1], Finished)


async def test_nothing_after_message_stop_is_read(connect):
    body = sse(message_start(), text_block(0, "Hi"), message_delta(), MESSAGE_STOP)
    body += b"event: content_block_delta\ndata: not json\n\n"
    provider, _ = connect(lambda _: sse_response(body))

    events = await collect(provider, make_request())

    assert text_of(events) == "Hi"


async def test_error_event_mid_stream_is_interrupted(connect):
    overloaded = ("error", error_body("overloaded_error", "Overloaded: secret details"))
    body = sse(message_start(), text_block(0, "Hello"), overloaded)
    provider, _ = connect(lambda _: sse_response(body))
    events: list[Event] = []

    with pytest.raises(StreamInterrupted) as info:
        await drain(provider.stream(make_request()), events)

    assert events == [Accepted(), TextDelta("Hello")]
    error = info.value
    assert error.reason == "STREAM_INTERRUPTED"
    assert error.retryable
    assert "overloaded_error" in error.message
    assert error.metadata["provider_code"] == "overloaded_error"
    assert "secret details" not in str(error)
    assert "secret details" not in " ".join(error.metadata.values())


async def test_stream_cut_before_message_stop_is_interrupted(connect):
    body = sse(message_start(), text_block(0, "Hello"), message_delta())
    provider, _ = connect(lambda _: sse_response(body))
    events: list[Event] = []

    with pytest.raises(StreamInterrupted):
        await drain(provider.stream(make_request()), events)

    assert events == [Accepted(), TextDelta("Hello")]


async def test_message_stop_without_a_stop_reason_is_interrupted(connect):
    body = sse(message_start(), text_block(0, "Hello"), message_delta(None), MESSAGE_STOP)
    provider, _ = connect(lambda _: sse_response(body))

    with pytest.raises(StreamInterrupted):
        await collect(provider, make_request())


async def test_connection_lost_after_accept_is_interrupted(connect):
    received = sse(message_start(), text_block(0, "Hello"), message_delta())
    body = then_raise(received, httpx.ReadError("connection reset"))
    provider, _ = connect(lambda _: httpx.Response(200, headers=SSE_HEADERS, content=body))
    events: list[Event] = []

    with pytest.raises(StreamInterrupted):
        await drain(provider.stream(make_request()), events)

    assert events == [Accepted(), TextDelta("Hello")]


async def test_non_json_event_data_is_a_protocol_error(connect):
    body = sse(message_start(), ("content_block_delta", "{not json"))
    provider, _ = connect(lambda _: sse_response(body))
    events: list[Event] = []

    with pytest.raises(BadUpstreamResponse) as info:
        await drain(provider.stream(make_request()), events)

    assert events == [Accepted()]
    assert info.value.reason == "BAD_UPSTREAM_RESPONSE"


@pytest.mark.parametrize(
    "event",
    [
        ("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": "Hi"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}},
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0}),
        (
            "content_block_start",
            {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use"}},
        ),
        ("message_start", {"type": "message_start", "message": None}),
        ("message_delta", {"type": "message_delta", "usage": {"output_tokens": 3}}),
    ],
    ids=[
        "delta-not-object",
        "delta-without-index",
        "text-delta-without-text",
        "start-without-block",
        "tool-use-without-id",
        "message-start-without-message",
        "message-delta-without-delta",
    ],
)
async def test_malformed_events_are_protocol_errors(connect, event):
    provider, _ = connect(lambda _: sse_response(sse(message_start(), event)))

    with pytest.raises(BadUpstreamResponse):
        await collect(provider, make_request())


async def test_a_json_answer_to_a_stream_request_is_a_protocol_error(connect):
    provider, _ = connect(lambda _: httpx.Response(200, json=message_body()))

    with pytest.raises(BadUpstreamResponse):
        await collect(provider, make_request())


# --- HTTP errors, for both calls -----------------------------------------------------------


MODES = ["stream", "complete"]


def json_response(status: int, body: dict[str, Any], **headers: str) -> Handler:
    return lambda _: httpx.Response(status, json=body, headers=headers)


@pytest.mark.parametrize("mode", MODES)
async def test_429_with_retry_after_is_rate_limited(connect, mode):
    body = error_body("rate_limit_error", "Number of request tokens has exceeded your limit.")
    provider, _ = connect(json_response(429, body, **{"retry-after": "3"}))

    with pytest.raises(UpstreamRateLimited) as info:
        await call(provider, make_request(), mode)

    assert info.value.retry_after_s == 3
    assert info.value.reason == "UPSTREAM_RATE_LIMITED"
    assert info.value.metadata["provider_code"] == "rate_limit_error"


@pytest.mark.parametrize("mode", MODES)
async def test_529_overloaded_is_provider_unavailable_and_retryable(connect, mode):
    provider, _ = connect(json_response(529, error_body("overloaded_error", "Overloaded")))

    with pytest.raises(ProviderUnavailable) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "PROVIDER_UNAVAILABLE"
    assert info.value.retryable
    assert info.value.metadata["http_status"] == "529"
    assert info.value.metadata["provider_code"] == "overloaded_error"


@pytest.mark.parametrize("mode", MODES)
async def test_400_prompt_too_long_is_context_length_exceeded(connect, mode):
    body = error_body("invalid_request_error", "prompt is too long: 215012 tokens > 200000 maximum")
    provider, _ = connect(json_response(400, body))

    with pytest.raises(ContextLengthExceeded) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "CONTEXT_LENGTH_EXCEEDED"
    assert not info.value.retryable
    assert "215012" not in str(info.value)


@pytest.mark.parametrize("mode", MODES)
async def test_other_400_is_rejected_with_the_type_but_not_the_message(connect, mode):
    body = error_body("invalid_request_error", "messages.1.content: secret details")
    provider, _ = connect(json_response(400, body))

    with pytest.raises(UpstreamRejected) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "UPSTREAM_REJECTED"
    assert "invalid_request_error" in info.value.message
    assert "secret details" not in str(info.value)


@pytest.mark.parametrize("mode", MODES)
async def test_401_is_auth_failed(connect, mode):
    provider, _ = connect(
        json_response(401, error_body("authentication_error", "invalid x-api-key"))
    )

    with pytest.raises(ProviderAuthFailed) as info:
        await call(provider, make_request(), mode)

    assert info.value.reason == "PROVIDER_AUTH_FAILED"
    assert not info.value.retryable


async def test_http_error_on_stream_yields_nothing_before_raising(connect):
    provider, _ = connect(json_response(500, error_body("api_error", "Internal server error")))
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
async def test_read_timeout_before_answering_is_upstream_timeout(connect, mode):
    provider, _ = connect(raising(httpx.ReadTimeout("timed out")))

    with pytest.raises(UpstreamTimeout):
        await call(provider, make_request(), mode)


# --- the unary answer -----------------------------------------------------------------------


async def test_complete_sends_a_unary_body_and_parses_a_text_answer(connect):
    content = [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "Strata!"}]
    provider, upstream = connect(lambda _: httpx.Response(200, json=message_body(content)))

    completion = await provider.complete(make_request(max_output_tokens=64))

    assert completion == Completion(
        text="Hello, Strata!",
        finish_reason=common_pb2.FINISH_REASON_STOP,
        usage=common_pb2.Usage(input_tokens=21, output_tokens=4),
        provider_model=SNAPSHOT,
    )
    body = upstream.body
    assert body["stream"] is False
    assert body["model"] == UPSTREAM_MODEL
    assert body["max_tokens"] == 64
    assert body["messages"] == [{"role": "user", "content": "Say hello to Strata."}]
    assert upstream.requests[0].url == httpx.URL(f"{BASE_URL}/messages")
    assert upstream.requests[0].headers["x-api-key"] == API_KEY


async def test_complete_parses_tool_calls(connect):
    content: list[dict[str, Any]] = [
        {"type": "thinking", "thinking": "Two cities.", "signature": "EqQBCgIYAhIM"},
        {"type": "text", "text": "Checking."},
        {
            "type": "tool_use",
            "id": "toolu_01A09q90qw90lq917835lq9",
            "name": "get_weather",
            "input": {"city": "Paris", "unit": "celsius"},
        },
        {
            "type": "tool_use",
            "id": "toolu_01C5dkW2s8YhQ1pN6vE0aJ3t",
            "name": "get_time",
            "input": {},
        },
    ]
    provider, _ = connect(
        lambda _: httpx.Response(200, json=message_body(content, stop_reason="tool_use"))
    )

    completion = await provider.complete(
        make_request(params=with_tools(common_pb2.TOOL_CHOICE_MODE_AUTO))
    )

    assert completion.text == "Checking."
    assert completion.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
    assert [(c.id, c.name, json.loads(c.arguments_json)) for c in completion.tool_calls] == [
        ("toolu_01A09q90qw90lq917835lq9", "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("toolu_01C5dkW2s8YhQ1pN6vE0aJ3t", "get_time", {}),
    ]


async def test_complete_counts_cached_input(connect):
    usage = {
        "input_tokens": 10,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 2048,
        "output_tokens": 4,
    }
    provider, _ = connect(lambda _: httpx.Response(200, json=message_body(usage=usage)))

    completion = await provider.complete(make_request())

    assert completion.usage == common_pb2.Usage(input_tokens=2058, output_tokens=4)


async def test_complete_without_usage_estimates_it(connect):
    body = message_body()
    del body["usage"]
    provider, _ = connect(lambda _: httpx.Response(200, json=body))

    completion = await provider.complete(make_request())

    assert completion.usage.estimated
    assert completion.usage.input_tokens > 0
    assert completion.usage.output_tokens > 0


@pytest.mark.parametrize(
    "content",
    [
        b"<html>gateway</html>",
        b"[]",
        b'{"type": "message", "role": "assistant"}',
        b'{"type": "message", "content": "Hello"}',
        b'{"type": "message", "content": [{"type": "text"}]}',
        b'{"type": "message", "content": ["Hello"]}',
        b'{"type": "message", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}',
    ],
    ids=[
        "not-json",
        "not-object",
        "no-content",
        "content-not-list",
        "text-without-text",
        "block-not-object",
        "tool-use-without-input",
    ],
)
async def test_complete_unreadable_answer_is_a_protocol_error(connect, content):
    provider, _ = connect(lambda _: httpx.Response(200, content=content))

    with pytest.raises(BadUpstreamResponse):
        await provider.complete(make_request())


# --- embeddings -------------------------------------------------------------------------------


async def test_embed_is_rejected_without_calling_upstream(connect):
    provider, upstream = connect(lambda _: httpx.Response(500))
    model = ModelConfig(name="emb", provider="anthropic", upstream_model="none", kind="embedding")

    with pytest.raises(UpstreamRejected) as info:
        await provider.embed(model, ["hello"], Deadline.after(5))

    assert info.value.reason == "UPSTREAM_REJECTED"
    assert "has no embeddings" in info.value.message
    assert upstream.requests == []


# --- the API key never leaks -----------------------------------------------------------------


LEAKY_UPSTREAMS: dict[str, Handler] = {
    "401-echoing-key": json_response(
        401, error_body("authentication_error", f"invalid x-api-key: {API_KEY}")
    ),
    "403": json_response(403, error_body("permission_error", f"key {API_KEY} may not")),
    "429": json_response(429, error_body("rate_limit_error", f"key {API_KEY} is throttled")),
    "400": json_response(400, error_body("invalid_request_error", f"bad request for {API_KEY}")),
    "529": json_response(529, error_body("overloaded_error", f"overloaded for {API_KEY}")),
    "connect-error": raising(httpx.ConnectError(f"connection refused ({API_KEY})")),
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
    leaky = ("error", error_body("authentication_error", f"key {API_KEY} revoked"))
    provider, _ = connect(lambda _: sse_response(sse(message_start(), text_block(0, "Hi"), leaky)))

    with pytest.raises(ProviderError) as info:
        await collect(provider, make_request())

    assert API_KEY not in str(info.value)
    assert API_KEY not in " ".join(info.value.metadata.values())
