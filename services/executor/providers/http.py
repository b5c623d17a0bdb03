"""What the HTTP providers share: their pooled client, credentials, timeouts, error mapping.

Error mapping is the one place an upstream HTTP failure becomes a Strata reason. The
provider's body is read to classify the failure (its error code or type, whether it speaks
of the context length or content policy) but never passed on: only the status, the provider
name and, when it is a plain token, the provider's error code reach the client.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from services.common.calls import Deadline
from services.common.catalog import HttpProviderConfig, ModelConfig
from services.common.errors import (
    BadUpstreamResponse,
    ContentFiltered,
    ContextLengthExceeded,
    ProviderAuthFailed,
    ProviderError,
    ProviderUnavailable,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamRejected,
    UpstreamTimeout,
)
from services.common.settings import ConfigError

MAX_ERROR_BODY = 64 * 1024
_TOKEN = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_QUOTA_CODES = {"insufficient_quota", "billing_hard_limit_reached", "insufficient_credits"}
_CONTEXT_CODES = {"context_length_exceeded", "string_above_max_length"}
_CONTENT_CODES = {"content_filter", "content_policy_violation"}
_CONTEXT_WORDS = re.compile(
    r"context (length|window)|too long|maximum context|too many tokens", re.I
)
_CONTENT_WORDS = re.compile(r"content (policy|filter|management)|safety system", re.I)
_QUOTA_WORDS = re.compile(r"credit balance|insufficient (credit|funds|quota)|billing", re.I)


def plain_token(value: object) -> str:
    """`value` when it is a short plain token (an error code or type), else ""."""
    return value if isinstance(value, str) and _TOKEN.fullmatch(value) else ""


def api_key(name: str, config: HttpProviderConfig) -> str | None:
    """The provider's key, from its secrets file or environment variable; read at start-up."""
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


def pooled_client(
    config: HttpProviderConfig,
    headers: Mapping[str, str],
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """One client per provider entry for the life of the process."""
    return httpx.AsyncClient(
        base_url=config.base_url.rstrip("/") + "/",
        headers={"user-agent": "strata-executor", **config.headers, **headers},
        limits=httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_connections,
        ),
        http2=config.http2,
        transport=transport,
    )


def timeout(model: ModelConfig, deadline: Deadline) -> httpx.Timeout:
    """Timeouts of one HTTP exchange: the model's connect timeout, the rest of the deadline."""
    remaining = deadline.remaining()
    return httpx.Timeout(
        connect=min(model.timeouts.connect_s, remaining),
        read=remaining,
        write=remaining,
        pool=remaining,
    )


def retry_after_s(response: httpx.Response) -> float | None:
    """The delay a 429 or 503 asks for (retry-after-ms or retry-after seconds)."""
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


def _error_fields(body: bytes) -> tuple[str, str]:
    """(code or type as a plain token, message) of an error body; never forwarded."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return "", ""
    if not isinstance(error, dict):
        return "", ""
    message = error.get("message") if isinstance(error.get("message"), str) else ""
    code = plain_token(error.get("code")) or plain_token(error.get("type"))
    return code, str(message)


def status_error(provider: str, response: httpx.Response, body: bytes) -> ProviderError:
    """The error for a non-2xx answer."""
    status = response.status_code
    code, message = _error_fields(body[:MAX_ERROR_BODY])
    what = f"provider {provider!r} answered HTTP {status}" + (f" ({code})" if code else "")
    metadata = {"provider": provider, "http_status": str(status)}
    if code:
        metadata["provider_code"] = code
    if status == 402 or code in _QUOTA_CODES or (status < 500 and _QUOTA_WORDS.search(message)):
        return UpstreamQuotaExhausted(what, metadata=metadata)
    if status == 429:
        return UpstreamRateLimited(what, retry_after_s=retry_after_s(response), metadata=metadata)
    if status in (401, 403):
        return ProviderAuthFailed(what, metadata=metadata)
    if status in (408, 504):
        return UpstreamTimeout(what, metadata=metadata)
    if 400 <= status < 500:
        if code in _CONTEXT_CODES or _CONTEXT_WORDS.search(message):
            return ContextLengthExceeded(what, metadata=metadata)
        if code in _CONTENT_CODES or _CONTENT_WORDS.search(message):
            return ContentFiltered(what, metadata=metadata)
        return UpstreamRejected(what, metadata=metadata)
    unavailable = ProviderUnavailable(what, metadata=metadata)
    unavailable.retry_after_s = retry_after_s(response)  # 503 and 529 may ask for a pause
    return unavailable


def transport_error(provider: str, err: httpx.HTTPError) -> ProviderError:
    """The error for a failure of the connection itself, before any answer."""
    if isinstance(err, httpx.TimeoutException):
        return UpstreamTimeout(f"provider {provider!r} did not answer in time")
    return ProviderUnavailable(f"provider {provider!r} is unreachable")


def json_body(provider: str, response: httpx.Response) -> dict[str, Any]:
    """A 200 answer's JSON object; BAD_UPSTREAM_RESPONSE when it is not one."""
    try:
        body = response.json()
    except ValueError as err:
        raise BadUpstreamResponse(f"provider {provider!r} sent a body that is not JSON") from err
    if not isinstance(body, dict):
        raise BadUpstreamResponse(f"provider {provider!r} sent a body that is not an object")
    return body


def json_event(provider: str, data: str) -> dict[str, Any]:
    """One server-sent event's JSON object; BAD_UPSTREAM_RESPONSE when it is not one."""
    try:
        event = json.loads(data)
    except ValueError as err:
        raise BadUpstreamResponse(f"provider {provider!r} sent an event that is not JSON") from err
    if not isinstance(event, dict):
        raise BadUpstreamResponse(f"provider {provider!r} sent an event that is not an object")
    return event
