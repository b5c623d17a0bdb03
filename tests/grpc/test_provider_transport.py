"""The executor's HTTP transport against upstreams that break HTTP itself.

A raw TCP server (no HTTP library) answers each request the way its case says: a body cut
short of its Content-Length, bytes that are not HTTP, a connection closed without an
answer, headers and then silence, a gzip-encoded body. Each fault must become the reason
it always meant (the same httpx's own transport gave), never an internal error.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
from collections.abc import AsyncIterator

import pytest

from services.common.calls import Deadline
from services.common.catalog import ModelConfig, OpenAICompatibleProviderConfig
from services.common.errors import StrataError
from services.executor.providers.base import ProviderRequest
from services.executor.providers.openai_compatible import OpenAICompatibleProvider
from strata.common.v1 import common_pb2
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import user

ANSWER = {
    "model": "gpt-upstream-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "zipped"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1},
}


def _reply(case: str) -> bytes | None:
    """What the server sends for `case` (None: nothing, keep the connection open)."""
    if case == "truncated":
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            b'{"choices":'
        )
    if case == "not-http":
        return b"NOT HTTP AT ALL\r\n\r\n"
    if case == "closed":
        return b""
    if case == "gzip":
        body = gzip.compress(json.dumps(ANSWER).encode())
        return (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: gzip\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        ) + body
    return None  # silent


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[OpenAICompatibleProvider, dict[str, str]]]:
    """A provider on a raw server; set `case` in the dict to pick the server's behaviour."""
    case = {"case": "closed"}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            reply = _reply(case["case"])
            if reply is None:
                await reader.read()  # silent until the client leaves
            else:
                writer.write(reply)
                await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = OpenAICompatibleProviderConfig(
        kind="openai_compatible", base_url=f"http://127.0.0.1:{port}/v1"
    )
    provider = OpenAICompatibleProvider("raw", config)
    yield provider, case
    await provider.aclose()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    ("case", "whole", "streamed"),
    [
        ("truncated", "PROVIDER_UNAVAILABLE", "BAD_UPSTREAM_RESPONSE"),
        ("not-http", "PROVIDER_UNAVAILABLE", "PROVIDER_UNAVAILABLE"),
        ("closed", "PROVIDER_UNAVAILABLE", "PROVIDER_UNAVAILABLE"),
        ("silent", "UPSTREAM_TIMEOUT", "UPSTREAM_TIMEOUT"),
        ("gzip", None, "BAD_UPSTREAM_RESPONSE"),
    ],
)
async def test_a_broken_upstream_is_the_reason_it_always_meant(
    upstream: tuple[OpenAICompatibleProvider, dict[str, str]],
    case: str,
    whole: str | None,
    streamed: str,
) -> None:
    provider, behaviour = upstream
    behaviour["case"] = case
    deadline_s = 0.5 if case == "silent" else 10.0

    def request() -> ProviderRequest:
        return ProviderRequest(
            model=ModelConfig(name="raw-model", provider="raw", upstream_model="raw-model"),
            messages=[user("hello")],
            params=common_pb2.GenerationParams(),
            max_output_tokens=64,
            deadline=Deadline.after(deadline_s),
            request_id="req-raw",
        )

    try:
        answer = await provider.complete(request())
        outcome = None
        assert (answer.text, answer.usage.output_tokens) == ("zipped", 1)  # decoded by httpx
    except StrataError as err:
        outcome = err.reason
    assert outcome == whole
    with pytest.raises(StrataError) as caught:
        async for _ in provider.stream(request()):
            pass
    assert caught.value.reason == streamed


async def test_an_idle_connection_is_closed_before_the_upstream_closes_it() -> None:
    """Pooled connections are reused back to back, and one idle longer than
    `idle_connection_s` is not: sent on while the upstream's keep-alive ends, a request
    would fail as the provider unavailable."""
    fake = FakeOpenAI().start()
    config = OpenAICompatibleProviderConfig(
        kind="openai_compatible", base_url=fake.base_url, idle_connection_s=0.3
    )
    provider = OpenAICompatibleProvider("fake", config)
    marker = uuid.uuid4().hex

    def request(n: int) -> ProviderRequest:
        return ProviderRequest(
            model=ModelConfig(name="fake-ok", provider="fake", upstream_model="fake-ok"),
            messages=[user(f"{marker} {n}")],
            params=common_pb2.GenerationParams(),
            max_output_tokens=64,
            deadline=Deadline.after(10),
            request_id=f"req-idle-{n}",
        )

    try:
        for n in range(3):
            if n == 2:
                await asyncio.sleep(0.8)
            answer = await provider.complete(request(n))
            assert answer.text
    finally:
        await provider.aclose()
        fake.stop()
    first, again, after_idle = (e.peer for e in fake.calls(marker))
    assert first == again
    assert after_idle != first
