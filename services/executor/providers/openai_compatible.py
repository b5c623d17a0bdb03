"""Any server speaking OpenAI's Chat Completions API: vLLM, Ollama, llama.cpp, hosted clones.

Translates Strata's request into `POST {base_url}/chat/completions`, unary or streamed over
server-sent events with `stream_options.include_usage`, and the answer back. One pooled
`httpx.AsyncClient` per provider entry. Failures become `ProviderError`s; the provider's
body is never passed on, only its HTTP status and, when it is a plain token, its error code.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import SSEError, aconnect_sse

from services.common.catalog import OpenAICompatibleProviderConfig
from services.common.errors import (
    ProviderError,
    ProviderProtocolError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    StreamInterrupted,
)
from services.common.settings import ConfigError
from services.common.validation import estimate_input_tokens
from services.executor.providers.base import (
    Accepted,
    Completion,
    Event,
    Finished,
    ProviderRequest,
    TextDelta,
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
_ERROR_CODE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_MAX_ERROR_BODY = 64 * 1024
DEFAULT_STALL_TIMEOUT_S = 60.0
"""Longest wait for the next bytes of a response, unless the model sets `stall_timeout_s`."""


def _api_key(name: str, config: OpenAICompatibleProviderConfig) -> str | None:
    if config.api_key_file is not None:
        try:
            return Path(config.api_key_file).read_text().strip()
        except OSError as err:
            raise ConfigError(f"provider {name!r}: cannot read api_key_file: {err}") from err
    if config.api_key_env is not None:
        key = os.environ.get(config.api_key_env)
        if not key:
            raise ConfigError(
                f"provider {name!r}: environment variable {config.api_key_env} is not set"
            )
        return key
    return None


def chat_body(request: ProviderRequest, *, stream: bool) -> dict[str, Any]:
    """The JSON body of a chat-completions call."""
    messages = []
    for m in request.messages:
        message: dict[str, Any] = {"role": _ROLES[m.role], "content": m.content}
        if m.name:
            message["name"] = m.name
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    body: dict[str, Any] = {
        "model": request.model.upstream_model,
        "messages": messages,
        "max_tokens": request.max_output_tokens,
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
    return body


def _retry_after_s(response: httpx.Response) -> float | None:
    for header, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = response.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
    return None


def _error_code(body: bytes) -> str:
    """The provider's error code or type, when it is a plain token; never free text."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return ""
    if not isinstance(error, dict):
        return ""
    for field in ("code", "type"):
        value = error.get(field)
        if isinstance(value, str) and _ERROR_CODE.fullmatch(value):
            return value
    return ""


def status_error(provider: str, response: httpx.Response, body: bytes) -> ProviderError:
    """The error for a non-2xx answer."""
    status = response.status_code
    code = _error_code(body)
    what = f"provider {provider!r} answered HTTP {status}" + (f" ({code})" if code else "")
    metadata = {"provider": provider, "http_status": str(status)}
    if code:
        metadata["provider_code"] = code
    if status == 429:
        if code == "insufficient_quota":
            return ProviderRateLimited(
                what, retry_after_s=None, reason="PROVIDER_QUOTA_EXHAUSTED", metadata=metadata
            )
        return ProviderRateLimited(what, retry_after_s=_retry_after_s(response), metadata=metadata)
    if status in (401, 403):
        return ProviderUnavailable(what, reason="PROVIDER_AUTH_FAILED", metadata=metadata)
    if status in (408, 504):
        return ProviderTimeout(what, metadata=metadata)
    if 400 <= status < 500:
        return ProviderRejected(what, metadata=metadata)
    return ProviderUnavailable(what, metadata=metadata)


def _usage(raw: Any) -> common_pb2.Usage | None:
    """The reported usage, or None when it is missing or incomplete (then it is estimated)."""
    if not isinstance(raw, dict):
        return None
    prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return common_pb2.Usage(input_tokens=prompt, output_tokens=completion)


def _delta_text(provider: str, choice: dict[str, Any]) -> str | None:
    delta = choice.get("delta") or {}
    text = delta.get("content") if isinstance(delta, dict) else delta
    if not isinstance(delta, dict) or (text is not None and not isinstance(text, str)):
        raise ProviderProtocolError(f"provider {provider!r} sent a delta that is not text")
    return text


def _estimated_usage(request: ProviderRequest, text: str) -> common_pb2.Usage:
    return common_pb2.Usage(
        input_tokens=estimate_input_tokens(request.messages),
        output_tokens=math.ceil(len(text.encode()) / 4),
    )


class OpenAICompatibleProvider:
    """Chat completions over HTTP, pooled per provider entry."""

    def __init__(
        self,
        name: str,
        config: OpenAICompatibleProviderConfig,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.name = name
        self._config = config
        headers = {"user-agent": "strata-executor", **config.headers}
        key = _api_key(name, config)
        if key:
            headers["authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(
            base_url=config.base_url.rstrip("/") + "/",
            headers=headers,
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
            ),
            transport=transport,
        )

    def _timeout(self, request: ProviderRequest) -> httpx.Timeout:
        remaining = request.deadline.remaining()
        stall = float(request.model.options.get("stall_timeout_s", DEFAULT_STALL_TIMEOUT_S))
        return httpx.Timeout(
            connect=min(self._config.connect_timeout_s, remaining),
            read=min(stall, remaining),
            write=remaining,
            pool=remaining,
        )

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Event, None]:
        parts: list[str] = []
        finish: common_pb2.FinishReason | None = None
        usage: common_pb2.Usage | None = None
        provider_model = request.model.upstream_model
        accepted = False
        try:
            async with aconnect_sse(
                self._client,
                "POST",
                "chat/completions",
                json=chat_body(request, stream=True),
                # a copy: the SSE helper adds its own headers to the dict it is given
                headers=dict(request.model.headers),
                timeout=self._timeout(request),
            ) as source:
                response = source.response
                if response.status_code != 200:
                    body = await response.aread()
                    raise status_error(self.name, response, body[:_MAX_ERROR_BODY])
                accepted = True
                yield Accepted()
                async for sse in source.aiter_sse():
                    if not sse.data:
                        continue  # comments and keep-alive events carry no data
                    if sse.data == "[DONE]":
                        break
                    try:
                        chunk = json.loads(sse.data)
                    except ValueError as err:
                        raise ProviderProtocolError(
                            f"provider {self.name!r} sent an event that is not JSON"
                        ) from err
                    if not isinstance(chunk, dict):
                        raise ProviderProtocolError(f"provider {self.name!r} sent a bad event")
                    if "error" in chunk:
                        raise ProviderUnavailable(
                            f"provider {self.name!r} reported an error mid-stream",
                            reason="STREAM_INTERRUPTED",
                        )
                    provider_model = chunk.get("model") or provider_model
                    usage = _usage(chunk.get("usage")) or usage
                    for choice in chunk.get("choices") or ():
                        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                            continue
                        text = _delta_text(self.name, choice)
                        if text:
                            parts.append(text)
                            yield TextDelta(text)
                        reason = choice.get("finish_reason")
                        if reason:
                            finish = FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_STOP)
        except httpx.TimeoutException as err:
            raise ProviderTimeout(f"provider {self.name!r} did not answer in time") from err
        except SSEError as err:
            raise ProviderProtocolError(
                f"provider {self.name!r} answered a stream request without an event stream"
            ) from err
        except httpx.TransportError as err:
            if accepted:
                raise StreamInterrupted(f"provider {self.name!r}'s stream broke") from err
            raise ProviderUnavailable(f"provider {self.name!r} is unreachable") from err
        if finish is None:
            raise StreamInterrupted(f"provider {self.name!r}'s stream ended before its final event")
        if usage is None:
            log.warning("provider %r reported no usage; estimating it", self.name)
            usage = _estimated_usage(request, "".join(parts))
        yield Finished(finish_reason=finish, usage=usage, provider_model=provider_model)

    async def complete(self, request: ProviderRequest) -> Completion:
        try:
            response = await self._client.post(
                "chat/completions",
                json=chat_body(request, stream=False),
                headers=request.model.headers,
                timeout=self._timeout(request),
            )
        except httpx.TimeoutException as err:
            raise ProviderTimeout(f"provider {self.name!r} did not answer in time") from err
        except httpx.TransportError as err:
            raise ProviderUnavailable(f"provider {self.name!r} is unreachable") from err
        if response.status_code != 200:
            raise status_error(self.name, response, response.content[:_MAX_ERROR_BODY])
        try:
            body = response.json()
            choice = body["choices"][0]
            text = choice["message"].get("content") or ""
            finish = FINISH_REASONS.get(
                choice.get("finish_reason") or "stop", common_pb2.FINISH_REASON_STOP
            )
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as err:
            raise ProviderProtocolError(
                f"provider {self.name!r} sent an unreadable answer"
            ) from err
        usage = _usage(body.get("usage"))
        if usage is None:
            log.warning("provider %r reported no usage; estimating it", self.name)
            usage = _estimated_usage(request, text)
        return Completion(text, finish, usage, body.get("model") or request.model.upstream_model)

    async def aclose(self) -> None:
        await self._client.aclose()
