"""What the HTTP providers share: their pooled client, credentials, timeouts, error mapping.

A provider's calls go over HTTP/1.1, plain or TLS, through `AiohttpTransport`, httpx's
transport interface over an aiohttp session: aiohttp parses responses in C, where httpx's
own transport (httpcore, h11) parses them in Python, and an exchange costs the executor
about half the CPU (see bench/RESULTS.md). Requests and responses are httpx's. HTTP/2 is not
offered: httpx's (httpcore, h2) neither stops the upstream when a caller leaves a stream nor
frees the stream (see `http2` in services/common/catalog.py).

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
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yarl
from aiohttp.helpers import get_env_proxy_for_url

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
from services.executor.providers.base import Content, coalesced

_Proxy = tuple[yarl.URL | None, aiohttp.BasicAuth | None]
"""A proxy for an origin (none: None) and its credentials."""

DEFAULT_HEADERS = {
    "accept": "*/*",
    "accept-encoding": "gzip, deflate",  # (the body is decoded by httpx's response)
    "connection": "keep-alive",
    "user-agent": "strata-executor",
}
"""What httpx's client sends on every request, with our user agent for its own."""
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
) -> Upstream:
    """One client per provider entry for the life of the process, over `transport` (a
    test's), else over aiohttp."""
    if transport is None:
        limits = httpx.Limits(
            max_connections=config.max_connections,
            max_keepalive_connections=config.max_connections,
            keepalive_expiry=config.idle_connection_s,
        )
        # (A TLS context is 26 ms of work: made only for a TLS upstream.)
        tls = tls_context(config) if config.base_url.startswith("https:") else None
        transport = AiohttpTransport(limits, tls)
    return Upstream(
        httpx.URL(config.base_url.rstrip("/") + "/"),
        {**DEFAULT_HEADERS, **config.headers, **headers},
        transport,
    )


def tls_context(config: HttpProviderConfig) -> ssl.SSLContext:
    """What the provider's certificate is checked against: its `ca_file`, or the public
    authorities (certifi's, or those SSL_CERT_FILE or SSL_CERT_DIR name, as httpx reads them)."""
    if config.ca_file is None:
        return httpx.create_ssl_context()
    try:
        return ssl.create_default_context(cafile=str(config.ca_file))
    except (OSError, ssl.SSLError) as err:
        raise ConfigError(f"cannot load ca_file {config.ca_file}: {err}") from err


class Upstream:
    """A provider's base URL, default headers and pooled transport.

    A request is built as httpx's client builds it (its default headers, then the call's;
    the JSON body encoded by httpx) and handed straight to the transport. httpx's client
    would, on every call, do what a provider call never uses: merge a relative URL, keep
    and send cookies (another tenant's, the next call), run an auth flow, follow redirects,
    run event hooks and log a line; about a third of the executor's CPU for an upstream call
    (150 µs here, bench/RESULTS.md). No cookie an upstream sets is kept."""

    def __init__(
        self, base_url: httpx.URL, headers: Mapping[str, str], transport: httpx.AsyncBaseTransport
    ) -> None:
        self.base_url = base_url
        self._headers = httpx.Headers(headers)
        self._transport = transport

    def endpoint(self, path: str) -> httpx.URL:
        """`path` under the base URL, merged once, as httpx would merge it on every call."""
        base = self.base_url
        return base.copy_with(raw_path=base.raw_path + path.encode("ascii"))

    async def post(
        self, url: httpx.URL, *, json: Any, headers: Mapping[str, str], timeouts: httpx.Timeout
    ) -> httpx.Response:
        """The response, read whole (its connection back in the pool)."""
        response = await self._send(url, json, headers, timeouts)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response

    @asynccontextmanager
    async def stream(
        self, url: httpx.URL, *, json: Any, headers: Mapping[str, str], timeouts: httpx.Timeout
    ) -> AsyncIterator[httpx.Response]:
        """The response as it arrives; closed on leaving (early: its connection closes)."""
        response = await self._send(url, json, headers, timeouts)
        try:
            yield response
        finally:
            await response.aclose()

    async def _send(
        self, url: httpx.URL, body: Any, headers: Mapping[str, str], timeouts: httpx.Timeout
    ) -> httpx.Response:
        merged = self._headers.copy()
        merged.update(headers)
        request = httpx.Request(
            "POST", url, json=body, headers=merged, extensions={"timeout": timeouts.as_dict()}
        )
        response = await self._transport.handle_async_request(request)
        response.request = request
        return response

    async def aclose(self) -> None:
        await self._transport.aclose()


class AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over one aiohttp session (HTTP/1.1, pooled keep-alive).

    A proxy named in the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY; read as aiohttp
    reads them) is used, as httpx's client would: looked up once per origin, not per call.

    aiohttp's failures become the httpx exceptions httpx's own transport raises for the same
    fault, so `transport_error` and the providers see one family: a timeout is a
    `TimeoutException`, anything else a `TransportError`. A response read to its end gives
    its connection back to the pool; one closed early closes it, so the upstream sees the
    caller leave and stops generating."""

    def __init__(self, limits: httpx.Limits, tls: ssl.SSLContext | None = None) -> None:
        self._limits = limits
        self._tls = tls
        self._session: aiohttp.ClientSession | None = None
        self._proxies: dict[tuple[str, str, int | None], _Proxy] = {}

    def _open(self) -> aiohttp.ClientSession:
        """The session, made on first use (it belongs to the running event loop)."""
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections or 0,
            keepalive_timeout=self._limits.keepalive_expiry,
            ssl=self._tls or httpx.create_ssl_context(),
        )
        # No cookie jar, no automatic decompression: httpx's client decodes the body.
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )
        return self._session

    def _proxy(self, url: httpx.URL) -> _Proxy:
        origin = (url.scheme, url.host, url.port)
        proxy = self._proxies.get(origin)
        if proxy is None:
            try:
                proxy = get_env_proxy_for_url(yarl.URL(str(url)))
            except LookupError:
                proxy = (None, None)
            self._proxies[origin] = proxy
        return proxy

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        timeouts = request.extensions.get("timeout", {})
        proxy, proxy_auth = self._proxy(request.url)
        try:
            response = await session.request(
                request.method,
                str(request.url),
                headers=request.headers.multi_items(),
                data=await request.aread() or None,
                allow_redirects=False,
                proxy=proxy,
                proxy_auth=proxy_auth,
                timeout=aiohttp.ClientTimeout(
                    connect=timeouts.get("pool"),
                    sock_connect=timeouts.get("connect"),
                    sock_read=timeouts.get("read"),
                ),
            )
        except (aiohttp.ClientError, TimeoutError) as err:
            raise _httpx_error(err, connecting=True) from err
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


class _Body(httpx.AsyncByteStream):
    """An aiohttp response's body, as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            async for data in content.iter_any():
                yield data
        except (aiohttp.ClientError, TimeoutError) as err:
            # What the upstream sent before the fault was sent (and billed): pass it on.
            if arrived := _arrived(content):
                yield arrived
            raise _httpx_error(err, connecting=False) from err

    async def aclose(self) -> None:
        if self._response.content.at_eof():
            self._response.release()  # whole: the connection goes back to the pool
        else:
            self._response.close()


def _arrived(content: aiohttp.StreamReader) -> bytes:
    """The data that reached `content` ahead of a fault and was not read yet.

    aiohttp's reader raises a fault before handing out the data buffered ahead of it, and
    has no public way to read that data: this reads its private buffer (a deque of bytes
    and the offset read into the first). tests/grpc/test_executor_faults.py pins it: a
    stream cut after some chunks passes on every chunk sent."""
    buffer = getattr(content, "_buffer", None)
    if not buffer:
        return b""
    data = b"".join(buffer)[getattr(content, "_buffer_offset", 0) :]
    buffer.clear()
    return data


def _httpx_error(err: BaseException, connecting: bool) -> httpx.HTTPError:
    """The httpx exception httpx's own transport raises for the same fault."""
    message = str(err) or type(err).__name__
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return httpx.ConnectTimeout(message)
    if isinstance(err, TimeoutError):
        return httpx.ReadTimeout(message)
    if isinstance(err, aiohttp.ClientConnectorError):
        return httpx.ConnectError(message)
    if isinstance(err, aiohttp.ClientResponseError | aiohttp.ServerDisconnectedError):
        return httpx.RemoteProtocolError(message)
    if connecting and not isinstance(err, aiohttp.ClientPayloadError):
        return httpx.ConnectError(message)
    return httpx.ReadError(message)


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


SSE_HEADERS = {"accept": "text/event-stream", "cache-control": "no-store"}
"""Headers of a request answered with server-sent events."""


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One event of an event stream: its type ("message" unless named) and its data."""

    event: str
    data: str


MAX_EVENT_BYTES = 4 * 1024 * 1024
"""Longest event (or line) an upstream may send: a stream that never ends one is refused
rather than buffered without bound."""


class SSEDecoder:
    """Server-sent events from the pieces of a body as they arrive (the WHATWG rules: a line
    ends in CRLF, LF or CR; a blank line ends an event; a line starting with `:` is a
    comment; `data` lines join with LF). An event without data is not one."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._tail = b""
        self._event = ""
        self._data: list[str] = []
        self._pending = 0
        """Bytes of the event being read (its data lines and the unfinished line)."""

    def feed(self, piece: bytes) -> list[ServerSentEvent]:
        """The events that `piece` completes; BAD_UPSTREAM_RESPONSE past MAX_EVENT_BYTES."""
        self._pending += len(piece)
        if self._pending > MAX_EVENT_BYTES:
            raise BadUpstreamResponse(
                f"provider {self._provider!r} sent an event longer than {MAX_EVENT_BYTES} bytes"
            )
        buffer = self._tail + piece
        # A CR at the very end may be the first half of a CRLF: its line waits for more.
        end = len(buffer) - 1 if buffer.endswith(b"\r") else len(buffer)
        complete = max(buffer.rfind(b"\n", 0, end), buffer.rfind(b"\r", 0, end)) + 1
        self._tail = buffer[complete:]
        if not complete:
            return []
        lines = buffer[:complete]
        if b"\r" in lines:
            lines = lines.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[ServerSentEvent] = []
        for raw in lines.split(b"\n")[:-1]:
            if not raw:
                if self._data:
                    events.append(ServerSentEvent(self._event or "message", "\n".join(self._data)))
                self._event, self._data = "", []
                self._pending = len(self._tail)
                continue
            line = raw.decode("utf-8", "replace")
            name, _, value = line.partition(":")
            if not name:
                continue  # a comment
            if value.startswith(" "):
                value = value[1:]
            if name == "data":
                self._data.append(value)
            elif name == "event":
                self._event = value
        return events


async def sse_reads(
    provider: str, response: httpx.Response
) -> AsyncIterator[list[ServerSentEvent]]:
    """The events of a streamed answer, a list per piece of its body as it arrived (what
    came together can be passed on together); BAD_UPSTREAM_RESPONSE when it is not an
    event stream."""
    content_type = response.headers.get("content-type", "").partition(";")[0]
    if "text/event-stream" not in content_type:
        raise BadUpstreamResponse(
            f"provider {provider!r} answered a stream request without an event stream"
        )
    decoder = SSEDecoder(provider)
    async for piece in response.aiter_bytes():
        if events := decoder.feed(piece):
            yield events


async def streamed_pieces(
    provider: str,
    response: httpx.Response,
    read: Callable[[ServerSentEvent], list[Content]],
) -> AsyncIterator[Content]:
    """The answer's pieces in a streamed answer, `read` turning each event into its pieces
    (or raising on an error event). What came in one read of the body goes on coalesced;
    what came before a fault goes on before the fault."""
    async for events in sse_reads(provider, response):
        pieces: list[Content] = []
        try:
            for sse in events:
                pieces += read(sse)
        finally:
            for piece in coalesced(pieces):
                yield piece
