"""Anthropic's Messages API.

Translates Strata's request into `POST {base_url}/messages`, unary or streamed over
server-sent events (`message_start` ... `message_stop`): system messages become `system`,
tool calls and tool results become `tool_use` and `tool_result` content blocks, consecutive
messages of one role are merged (Anthropic needs user and assistant turns to alternate),
tools and tool choice take Anthropic's shapes, and a JSON response format, which has no
field of its own, is asked for in the system prompt. The answer comes back as Strata's
events, tool calls included. Anthropic has no embeddings. One pooled HTTP client per
provider entry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any, NoReturn

import httpx

from services.common.calls import Deadline
from services.common.catalog import AnthropicProviderConfig, ModelConfig
from services.common.errors import BadUpstreamResponse, StreamInterrupted, UpstreamRejected
from services.executor import tokens
from services.executor.providers import http
from services.executor.providers.base import (
    Accepted,
    Completion,
    Content,
    Embeddings,
    Event,
    Finished,
    ProviderRequest,
    TextDelta,
    ToolCallPiece,
)
from strata.common.v1 import common_pb2

log = logging.getLogger(__name__)

STOP_REASONS = {
    "end_turn": common_pb2.FINISH_REASON_STOP,
    "stop_sequence": common_pb2.FINISH_REASON_STOP,
    "pause_turn": common_pb2.FINISH_REASON_STOP,
    "max_tokens": common_pb2.FINISH_REASON_LENGTH,
    "model_context_window_exceeded": common_pb2.FINISH_REASON_LENGTH,
    "tool_use": common_pb2.FINISH_REASON_TOOL_CALLS,
    "refusal": common_pb2.FINISH_REASON_CONTENT_FILTER,
}
"""Anthropic's stop reasons; any other is a plain stop."""
_TOOL_CHOICES: dict[int, dict[str, str]] = {
    common_pb2.TOOL_CHOICE_MODE_AUTO: {"type": "auto"},
    common_pb2.TOOL_CHOICE_MODE_REQUIRED: {"type": "any"},
    common_pb2.TOOL_CHOICE_MODE_NONE: {"type": "none"},
}
JSON_INSTRUCTION = (
    "Answer with only a single JSON object: no other text before or after it, no code fences."
)
SCHEMA_INSTRUCTION = "The JSON object must be valid against this JSON Schema:\n"
_CACHE_INPUTS = ("cache_creation_input_tokens", "cache_read_input_tokens")


# --- the request ------------------------------------------------------------------------


def _arguments(i: int, call: common_pb2.ToolCall) -> dict[str, Any]:
    """A tool call's arguments as the object Anthropic wants (never echoing them)."""
    try:
        arguments = json.loads(call.arguments_json or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise UpstreamRejected(
            f"messages[{i}]: the arguments of tool call {call.id!r} are not a JSON object"
        )
    return arguments


def _turn(i: int, m: common_pb2.ChatMessage) -> dict[str, Any]:
    """One non-system message as an Anthropic message."""
    if m.role == common_pb2.ROLE_USER:
        return {"role": "user", "content": m.content}
    if m.role == common_pb2.ROLE_TOOL:
        block = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content}
        return {"role": "user", "content": [block]}
    if m.role == common_pb2.ROLE_ASSISTANT:
        blocks: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
        blocks += [
            {"type": "tool_use", "id": c.id, "name": c.name, "input": _arguments(i, c)}
            for c in m.tool_calls
        ]
        return {"role": "assistant", "content": blocks}
    raise UpstreamRejected(f"messages[{i}] has a role Anthropic does not know")


def _blocks(content: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"type": "text", "text": content}] if isinstance(content, str) else content


def _conversation(messages: Sequence[common_pb2.ChatMessage]) -> tuple[list[str], list[Any]]:
    """(system texts, alternating messages) of a Strata conversation."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if m.role == common_pb2.ROLE_SYSTEM:
            system.append(m.content)
            continue
        turn = _turn(i, m)
        if not turn["content"]:
            continue  # an empty assistant turn says nothing, and Anthropic refuses it
        if turns and turns[-1]["role"] == turn["role"]:
            merged = _blocks(turns[-1]["content"]) + _blocks(turn["content"])
            # Tool results must open the user turn that answers the tool calls (stable sort).
            merged.sort(key=lambda block: block["type"] != "tool_result")
            turns[-1]["content"] = merged
        else:
            turns.append(turn)
    return system, turns


def _tools(params: common_pb2.GenerationParams, body: dict[str, Any]) -> None:
    if not params.tools:
        return  # without tools, every tool choice (validation allows only NONE) is moot
    tools = []
    for t in params.tools:
        schema = json.loads(t.parameters_json or '{"type": "object"}')
        schema.setdefault("type", "object")  # Anthropic requires it
        tool: dict[str, Any] = {"name": t.name, "input_schema": schema}
        if t.description:
            tool["description"] = t.description
        tools.append(tool)
    body["tools"] = tools
    mode = params.tool_choice.mode
    if mode == common_pb2.TOOL_CHOICE_MODE_FUNCTION:
        body["tool_choice"] = {"type": "tool", "name": params.tool_choice.function_name}
    elif mode in _TOOL_CHOICES:
        body["tool_choice"] = dict(_TOOL_CHOICES[mode])


def _format_instruction(fmt: common_pb2.ResponseFormat) -> str | None:
    """What the system prompt must say for the response format (Anthropic has no field)."""
    if fmt.type == common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT:
        return JSON_INSTRUCTION
    if fmt.type == common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        return f"{JSON_INSTRUCTION}\n{SCHEMA_INSTRUCTION}{fmt.json_schema}"
    return None


# --- the answer -------------------------------------------------------------------------


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _input_tokens(usage: Any) -> int | None:
    """Prompt tokens of a usage object: uncached plus cache writes and reads."""
    if not isinstance(usage, dict) or not _is_count(usage.get("input_tokens")):
        return None
    counts = [usage["input_tokens"], *(usage.get(k) for k in _CACHE_INPUTS)]
    return sum(c for c in counts if _is_count(c))


def _output_tokens(usage: Any) -> int | None:
    if not isinstance(usage, dict) or not _is_count(usage.get("output_tokens")):
        return None
    count: int = usage["output_tokens"]
    return count


def _finish(reason: str) -> common_pb2.FinishReason:
    return STOP_REASONS.get(reason, common_pb2.FINISH_REASON_STOP)


class _StreamReader:
    """Turns the events of one Messages stream into Strata's, remembering what they said."""

    def __init__(self, provider: str, model: str) -> None:
        self.provider = provider
        self.model = model
        self.input_tokens: int | None = None
        self.output_tokens: int | None = None
        self.stop_reason: str | None = None
        self.stopped = False
        self.output: list[str] = []
        self._calls: dict[int, int] = {}
        """Content block index of each tool_use block → its tool call index."""
        self._inputs: dict[int, Any] = {}
        """Tool call index → the input of its start event, until a piece of arguments came."""

    def _malformed(self, what: str) -> NoReturn:
        raise BadUpstreamResponse(f"provider {self.provider!r} sent a malformed {what} event")

    def _object(self, event: dict[str, Any], key: str, what: str) -> dict[str, Any]:
        value = event.get(key)
        if not isinstance(value, dict):
            self._malformed(what)
        return value

    def _index(self, event: dict[str, Any], what: str) -> int:
        index = event.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            self._malformed(what)
        return index

    def _piece(self, call: int, **fields: Any) -> ToolCallPiece:
        piece = common_pb2.ToolCallDelta(index=call, **fields)
        self.output.append(piece.arguments_json)
        return ToolCallPiece(piece)

    def read_sse(self, sse: http.ServerSentEvent) -> list[Content]:
        """The answer's events in one server-sent event."""
        if self.stopped or not sse.data or sse.event == "ping":
            # Keep-alives carry no answer; after message_stop the body is read to its end,
            # so the connection returns to the pool.
            return []
        event = http.json_event(self.provider, sse.data)
        # Anthropic names every event; an unnamed one says its type in its data.
        kind = sse.event if sse.event != "message" else str(event.get("type"))
        return self.read(kind, event)

    def read(self, kind: str, event: dict[str, Any]) -> list[Content]:
        """The answer's events in one upstream event; raises on an error event."""
        if kind == "message_start":
            message = self._object(event, "message", kind)
            model = message.get("model")
            self.model = model if isinstance(model, str) and model else self.model
            self.input_tokens = _input_tokens(message.get("usage"))
        elif kind == "content_block_start":
            return self._block_start(
                self._index(event, kind), self._object(event, "content_block", kind)
            )
        elif kind == "content_block_delta":
            return self._block_delta(self._index(event, kind), self._object(event, "delta", kind))
        elif kind == "content_block_stop":
            call = self._calls.get(self._index(event, kind))
            if call is not None and call in self._inputs:
                # A tool without arguments streams no pieces of them: send its whole input.
                return [self._piece(call, arguments_json=json.dumps(self._inputs.pop(call)))]
        elif kind == "message_delta":
            delta = self._object(event, "delta", kind)
            reason = delta.get("stop_reason")
            if isinstance(reason, str) and reason:
                self.stop_reason = reason
            # Its counts are cumulative; newer API versions repeat the input count.
            usage = event.get("usage")
            output, prompt = _output_tokens(usage), _input_tokens(usage)
            if output is not None:
                self.output_tokens = output
            if prompt is not None:
                self.input_tokens = prompt
        elif kind == "message_stop":
            self.stopped = True
        elif kind == "error":
            error = event.get("error")
            code = http.plain_token(error.get("type") if isinstance(error, dict) else None)
            metadata = {"provider": self.provider}
            if code:
                metadata["provider_code"] = code
            raise StreamInterrupted(
                f"provider {self.provider!r} reported an error mid-stream"
                + (f" ({code})" if code else ""),
                metadata=metadata,
            )
        # ping, and event types added after this adapter was written, carry no answer
        return []

    def _block_start(self, index: int, block: dict[str, Any]) -> list[Content]:
        kind = block.get("type")
        if kind == "text":
            text = block.get("text") or ""
            if not isinstance(text, str):
                self._malformed("content_block_start")
            self.output.append(text)
            return [TextDelta(text)] if text else []
        if kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str) or not call_id or not name:
                self._malformed("content_block_start")
            call = len(self._calls)
            self._calls[index] = call
            arguments = block.get("input")
            self._inputs[call] = arguments if isinstance(arguments, dict) else {}
            return [self._piece(call, id=call_id, name=name)]
        return []  # thinking and server-side tool blocks are not part of the answer

    def _block_delta(self, index: int, delta: dict[str, Any]) -> list[Content]:
        kind = delta.get("type")
        if kind == "text_delta":
            text = delta.get("text")
            if not isinstance(text, str):
                self._malformed("content_block_delta")
            self.output.append(text)
            return [TextDelta(text)] if text else []
        if kind == "input_json_delta" and index in self._calls:
            partial = delta.get("partial_json")
            if not isinstance(partial, str):
                self._malformed("content_block_delta")
            if not partial:
                return []
            call = self._calls[index]
            self._inputs.pop(call, None)
            return [self._piece(call, arguments_json=partial)]
        return []

    def usage(self, messages: Sequence[common_pb2.ChatMessage]) -> common_pb2.Usage:
        if self.input_tokens is None or self.output_tokens is None:
            log.warning(
                "provider %r reported no usage; counting it with the tokenizer", self.provider
            )
            return tokens.estimate_usage(messages, "".join(self.output))
        return common_pb2.Usage(input_tokens=self.input_tokens, output_tokens=self.output_tokens)


def _content(provider: str, body: dict[str, Any]) -> tuple[str, list[common_pb2.ToolCall]]:
    """The text and tool calls of a whole message."""
    content = body.get("content")
    if not isinstance(content, list):
        raise BadUpstreamResponse(f"provider {provider!r} sent an unreadable answer")
    texts: list[str] = []
    calls: list[common_pb2.ToolCall] = []
    for block in content:
        if not isinstance(block, dict):
            raise BadUpstreamResponse(f"provider {provider!r} sent an unreadable answer")
        kind = block.get("type")
        if kind == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise BadUpstreamResponse(f"provider {provider!r} sent an unreadable answer")
            texts.append(text)
        elif kind == "tool_use":
            call_id, name, arguments = block.get("id"), block.get("name"), block.get("input")
            if not isinstance(call_id, str) or not isinstance(name, str) or not call_id or not name:
                raise BadUpstreamResponse(f"provider {provider!r} sent a malformed tool call")
            if not isinstance(arguments, dict):
                raise BadUpstreamResponse(f"provider {provider!r} sent a malformed tool call")
            calls.append(
                common_pb2.ToolCall(id=call_id, name=name, arguments_json=json.dumps(arguments))
            )
        # thinking and server-side tool blocks are not part of the answer
    return "".join(texts), calls


class AnthropicProvider:
    """Messages over HTTP, pooled per provider entry."""

    def __init__(
        self,
        name: str,
        config: AnthropicProviderConfig,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        key = http.api_key(name, config)
        headers = {"x-api-key": key} if key else {}
        headers["anthropic-version"] = config.api_version
        self._client = http.pooled_client(config, headers, transport)
        self._messages = self._client.endpoint("messages")

    def messages_body(self, request: ProviderRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON body of a Messages call."""
        system, messages = _conversation(request.messages)
        params = request.params
        instruction = _format_instruction(params.response_format)
        if instruction is not None:
            system.append(instruction)
        body: dict[str, Any] = {
            "model": request.model.upstream_model,
            "max_tokens": request.max_output_tokens,
            "messages": messages,
            "stream": stream,
        }
        if system:
            body["system"] = "\n\n".join(system)
        if params.HasField("temperature"):
            # Anthropic's range is 0 to 1, Strata's (OpenAI's) 0 to 2: the top is the top.
            body["temperature"] = min(params.temperature, 1.0)
        if params.HasField("top_p"):
            body["top_p"] = params.top_p
        if params.stop:
            body["stop_sequences"] = list(params.stop)
        # params.seed: Anthropic has no reproducible sampling; ignored.
        _tools(params, body)
        return body

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Event, None]:
        reader = _StreamReader(self.name, request.model.upstream_model)
        accepted = False
        try:
            async with self._client.stream(
                self._messages,
                json=self.messages_body(request, stream=True),
                headers={**request.model.headers, **http.SSE_HEADERS},
                timeouts=http.timeout(request.model, request.deadline),
            ) as response:
                if response.status_code != 200:
                    raise http.status_error(self.name, response, await response.aread())
                accepted = True
                yield Accepted()
                async for piece in http.streamed_pieces(self.name, response, reader.read_sse):
                    yield piece
        except httpx.HTTPError as err:
            if accepted:
                raise StreamInterrupted(f"provider {self.name!r}'s stream broke") from err
            raise http.transport_error(self.name, err) from err
        if not reader.stopped or reader.stop_reason is None:
            raise StreamInterrupted(f"provider {self.name!r}'s stream ended before its final event")
        yield Finished(
            finish_reason=_finish(reader.stop_reason),
            usage=reader.usage(request.messages),
            provider_model=reader.model,
        )

    async def complete(self, request: ProviderRequest) -> Completion:
        try:
            response = await self._client.post(
                self._messages,
                json=self.messages_body(request, stream=False),
                headers=request.model.headers,
                timeouts=http.timeout(request.model, request.deadline),
            )
        except httpx.HTTPError as err:
            raise http.transport_error(self.name, err) from err
        if response.status_code != 200:
            raise http.status_error(self.name, response, response.content)
        body = http.json_body(self.name, response)
        text, calls = _content(self.name, body)
        reason = body.get("stop_reason")
        usage_body = body.get("usage")
        prompt, output = _input_tokens(usage_body), _output_tokens(usage_body)
        if prompt is None or output is None:
            log.warning("provider %r reported no usage; counting it with the tokenizer", self.name)
            usage = tokens.estimate_usage(
                request.messages, text + "".join(c.arguments_json for c in calls)
            )
        else:
            usage = common_pb2.Usage(input_tokens=prompt, output_tokens=output)
        model = body.get("model")
        return Completion(
            text,
            _finish(reason) if isinstance(reason, str) else common_pb2.FINISH_REASON_STOP,
            usage,
            model if isinstance(model, str) and model else request.model.upstream_model,
            calls,
        )

    async def embed(
        self, model: ModelConfig, inputs: Sequence[str], deadline: Deadline
    ) -> Embeddings:
        raise UpstreamRejected(f"provider {self.name!r} has no embeddings")

    async def aclose(self) -> None:
        await self._client.aclose()
