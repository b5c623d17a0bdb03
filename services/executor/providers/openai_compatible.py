"""Any server speaking OpenAI's Chat Completions API: vLLM, Ollama, llama.cpp, hosted clones.

Translates Strata's request into `POST {base_url}/chat/completions`, unary or streamed over
server-sent events with `stream_options.include_usage` (tools, tool choice and response
format passed through), and the answer back, tool calls included; embeddings through
`POST {base_url}/embeddings`. One pooled HTTP client per provider entry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Sequence
from typing import Any, ClassVar

import httpx

from services.common.calls import Deadline
from services.common.catalog import (
    ModelConfig,
    OpenAICompatibleProviderConfig,
    OpenAIProviderConfig,
)
from services.common.errors import BadUpstreamResponse, StreamInterrupted
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

_ROLES = {
    common_pb2.ROLE_SYSTEM: "system",
    common_pb2.ROLE_USER: "user",
    common_pb2.ROLE_ASSISTANT: "assistant",
    common_pb2.ROLE_TOOL: "tool",
}
FINISH_REASONS = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "content_filter": common_pb2.FINISH_REASON_CONTENT_FILTER,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
    "function_call": common_pb2.FINISH_REASON_TOOL_CALLS,
}
_TOOL_CHOICES = {
    common_pb2.TOOL_CHOICE_MODE_AUTO: "auto",
    common_pb2.TOOL_CHOICE_MODE_NONE: "none",
    common_pb2.TOOL_CHOICE_MODE_REQUIRED: "required",
}
_FORMATS = {
    common_pb2.RESPONSE_FORMAT_TYPE_TEXT: "text",
    common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT: "json_object",
}


def _message(m: common_pb2.ChatMessage) -> dict[str, Any]:
    message: dict[str, Any] = {"role": _ROLES[m.role], "content": m.content}
    if m.name:
        message["name"] = m.name
    if m.tool_call_id:
        message["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        message["content"] = m.content or None
        message["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments_json},
            }
            for c in m.tool_calls
        ]
    return message


def _tools(params: common_pb2.GenerationParams, body: dict[str, Any]) -> None:
    if params.tools:
        body["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": json.loads(t.parameters_json or "{}"),
                },
            }
            for t in params.tools
        ]
    mode = params.tool_choice.mode
    if mode == common_pb2.TOOL_CHOICE_MODE_FUNCTION:
        body["tool_choice"] = {
            "type": "function",
            "function": {"name": params.tool_choice.function_name},
        }
    elif mode in _TOOL_CHOICES:
        body["tool_choice"] = _TOOL_CHOICES[mode]
    fmt = params.response_format
    if fmt.type == common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {
                "name": fmt.schema_name,
                "schema": json.loads(fmt.json_schema),
                "strict": fmt.strict,
            },
        }
    elif fmt.type in _FORMATS:
        body["response_format"] = {"type": _FORMATS[fmt.type]}


def _usage(raw: Any) -> common_pb2.Usage | None:
    """The reported usage, or None when it is missing or incomplete (then it is estimated)."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return common_pb2.Usage(input_tokens=prompt, output_tokens=completion)


def _delta(provider: str, choice: dict[str, Any]) -> tuple[str | None, list[Any]]:
    """The text and tool-call pieces of one streamed choice."""
    delta = choice.get("delta") or {}
    if not isinstance(delta, dict):
        raise BadUpstreamResponse(f"provider {provider!r} sent a delta that is not an object")
    text = delta.get("content")
    calls = delta.get("tool_calls") or []
    if (text is not None and not isinstance(text, str)) or not isinstance(calls, list):
        raise BadUpstreamResponse(f"provider {provider!r} sent a malformed delta")
    return text, calls


def _tool_piece(provider: str, raw: Any) -> common_pb2.ToolCallDelta:
    try:
        function = raw.get("function") or {}
        return common_pb2.ToolCallDelta(
            index=int(raw.get("index", 0)),
            id=raw.get("id") or "",
            name=function.get("name") or "",
            arguments_json=function.get("arguments") or "",
        )
    except (AttributeError, TypeError, ValueError) as err:
        raise BadUpstreamResponse(f"provider {provider!r} sent a malformed tool call") from err


class _StreamedAnswer:
    """What a chat-completions event stream said so far."""

    def __init__(self, provider: str, provider_model: str) -> None:
        self.provider = provider
        self.provider_model = provider_model
        self.parts: list[str] = []
        self.finish: common_pb2.FinishReason | None = None
        self.usage: common_pb2.Usage | None = None
        self.ended = False

    def read(self, sse: http.ServerSentEvent) -> list[Content]:
        """The answer's pieces in one event; raises on an error event."""
        if self.ended or not sse.data:
            return []  # keep-alive events carry no data
        if sse.data == "[DONE]":
            # The body is still read to its end (at once, as a rule): a response left
            # unread closes its connection instead of returning it to the pool.
            self.ended = True
            return []
        chunk = http.json_event(self.provider, sse.data)
        if "error" in chunk:
            raise StreamInterrupted(f"provider {self.provider!r} reported an error mid-stream")
        self.provider_model = chunk.get("model") or self.provider_model
        self.usage = _usage(chunk.get("usage")) or self.usage
        pieces: list[Content] = []
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            text, calls = _delta(self.provider, choice)
            if text:
                self.parts.append(text)
                pieces.append(TextDelta(text))
            for raw in calls:
                piece = _tool_piece(self.provider, raw)
                self.parts.append(piece.arguments_json)
                pieces.append(ToolCallPiece(piece))
            reason = choice.get("finish_reason")
            if reason:
                self.finish = FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_STOP)
        return pieces


class OpenAICompatibleProvider:
    """Chat completions and embeddings over HTTP, pooled per provider entry."""

    token_limit_field: ClassVar[str] = "max_tokens"
    """The request field that bounds output tokens (OpenAI's own API renamed it)."""

    def __init__(
        self,
        name: str,
        config: OpenAICompatibleProviderConfig | OpenAIProviderConfig,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        key = http.api_key(name, config)
        headers = {"authorization": f"Bearer {key}"} if key else {}
        headers.update(self.extra_headers(config))
        self._client = http.pooled_client(config, headers, transport)
        self._chat = self._client.endpoint("chat/completions")
        self._embeddings = self._client.endpoint("embeddings")

    def extra_headers(
        self, config: OpenAICompatibleProviderConfig | OpenAIProviderConfig
    ) -> dict[str, str]:
        """Headers a subclass adds to every request."""
        return {}

    def chat_body(self, request: ProviderRequest, *, stream: bool) -> dict[str, Any]:
        """The JSON body of a chat-completions call."""
        body: dict[str, Any] = {
            "model": request.model.upstream_model,
            "messages": [_message(m) for m in request.messages],
            self.token_limit_field: request.max_output_tokens,
            "stream": stream,
        }
        if stream:
            body["stream_options"] = {"include_usage": True}
        params = request.params
        if params.HasField("temperature"):
            body["temperature"] = params.temperature
        if params.HasField("top_p"):
            body["top_p"] = params.top_p
        if params.stop:
            body["stop"] = list(params.stop)
        if params.HasField("seed"):
            body["seed"] = params.seed
        _tools(params, body)
        return body

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Event, None]:
        answer = _StreamedAnswer(self.name, request.model.upstream_model)
        accepted = False
        try:
            async with self._client.stream(
                self._chat,
                json=self.chat_body(request, stream=True),
                headers={**request.model.headers, **http.SSE_HEADERS},
                timeouts=http.timeout(request.model, request.deadline),
            ) as response:
                if response.status_code != 200:
                    raise http.status_error(self.name, response, await response.aread())
                accepted = True
                yield Accepted()
                async for piece in http.streamed_pieces(self.name, response, answer.read):
                    yield piece
        except httpx.HTTPError as err:
            if accepted:
                raise StreamInterrupted(f"provider {self.name!r}'s stream broke") from err
            raise http.transport_error(self.name, err) from err
        if answer.finish is None:
            raise StreamInterrupted(f"provider {self.name!r}'s stream ended before its final event")
        usage = answer.usage
        if usage is None:
            log.warning("provider %r reported no usage; counting it with the tokenizer", self.name)
            usage = tokens.estimate_usage(request.messages, "".join(answer.parts))
        yield Finished(
            finish_reason=answer.finish, usage=usage, provider_model=answer.provider_model
        )

    async def complete(self, request: ProviderRequest) -> Completion:
        try:
            response = await self._client.post(
                self._chat,
                json=self.chat_body(request, stream=False),
                headers=request.model.headers,
                timeouts=http.timeout(request.model, request.deadline),
            )
        except httpx.HTTPError as err:
            raise http.transport_error(self.name, err) from err
        if response.status_code != 200:
            raise http.status_error(self.name, response, response.content)
        body = http.json_body(self.name, response)
        try:
            choice = body["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            calls = [
                common_pb2.ToolCall(
                    id=c["id"],
                    name=c["function"]["name"],
                    arguments_json=c["function"]["arguments"],
                )
                for c in message.get("tool_calls") or ()
            ]
            reason = choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError, AttributeError) as err:
            raise BadUpstreamResponse(f"provider {self.name!r} sent an unreadable answer") from err
        if not isinstance(text, str):
            raise BadUpstreamResponse(f"provider {self.name!r} sent an unreadable answer")
        usage = _usage(body.get("usage"))
        if usage is None:
            log.warning("provider %r reported no usage; counting it with the tokenizer", self.name)
            usage = tokens.estimate_usage(
                request.messages, text + "".join(c.arguments_json for c in calls)
            )
        return Completion(
            text,
            FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_STOP),
            usage,
            body.get("model") or request.model.upstream_model,
            calls,
        )

    async def embed(
        self, model: ModelConfig, inputs: Sequence[str], deadline: Deadline
    ) -> Embeddings:
        body: dict[str, Any] = {
            "model": model.upstream_model,
            "input": list(inputs),
            "encoding_format": "float",
        }
        if model.dimensions:
            body["dimensions"] = model.dimensions
        try:
            response = await self._client.post(
                self._embeddings,
                json=body,
                headers=model.headers,
                timeouts=http.timeout(model, deadline),
            )
        except httpx.HTTPError as err:
            raise http.transport_error(self.name, err) from err
        if response.status_code != 200:
            raise http.status_error(self.name, response, response.content)
        answer = http.json_body(self.name, response)
        try:
            rows = sorted(answer["data"], key=lambda row: row["index"])
            vectors = [[float(v) for v in row["embedding"]] for row in rows]
        except (KeyError, TypeError, ValueError) as err:
            raise BadUpstreamResponse(f"provider {self.name!r} sent unreadable embeddings") from err
        if len(vectors) != len(inputs):
            raise BadUpstreamResponse(f"provider {self.name!r} sent {len(vectors)} embeddings")
        prompt = (answer.get("usage") or {}).get("prompt_tokens")
        usage = common_pb2.Usage(
            input_tokens=prompt if isinstance(prompt, int) else sum(map(tokens.count, inputs)),
            estimated=not isinstance(prompt, int),
        )
        return Embeddings(vectors=vectors, usage=usage)

    async def aclose(self) -> None:
        await self._client.aclose()
