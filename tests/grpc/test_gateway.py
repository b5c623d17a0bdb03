"""The OpenAI-compatible door through the official `openai` SDK (sync, async, streaming),
in front of the real orchestrator, control, cache and executor."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest

from services.gateway.app import start
from services.gateway.settings import GatewaySettings
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2
from tests.conftest import ApiKeys
from tests.grpc.conftest import Served
from tests.helpers import bearer, user


@pytest.fixture
async def door(orchestrator: Served) -> AsyncIterator[str]:
    """The door's base URL (…/v1)."""
    running = await start(
        GatewaySettings(port=0, orchestrator_address=orchestrator.address, log_level="WARNING")
    )
    try:
        yield f"http://127.0.0.1:{running.port}/v1"
    finally:
        await running.stop()


@contextlib.asynccontextmanager
async def client(door: str, key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=door, api_key=key, max_retries=0, timeout=15) as api:
        yield api


def sync_client(door: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=door, api_key=key, max_retries=0, timeout=15)


async def grpc_answer(served: Served, key: str, text: str, seed: int) -> Any:
    return await served.stub.Generate(
        orchestrator_pb2.GenerateRequest(
            model="mock-fast",
            messages=[user(text)],
            params=common_pb2.GenerationParams(seed=seed),
            cache_policy=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_BYPASS),
        ),
        metadata=bearer(key),
        timeout=10,
    )


async def test_a_chat_completion_is_the_orchestrators_answer(
    door: str, orchestrator: Served, test_keys: ApiKeys
) -> None:
    expected = await grpc_answer(orchestrator, test_keys.acme, "hello door", 4)
    async with client(door, test_keys.acme) as api:
        reply = await api.chat.completions.create(
            model="mock-fast",
            messages=[{"role": "user", "content": "hello door"}],
            seed=4,
            extra_headers={"Idempotency-Key": "door-unary-1"},
        )
    assert reply.object == "chat.completion"
    assert reply.id == "chatcmpl-door-unary-1"
    assert reply.model == "mock-fast"
    [choice] = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == expected.text
    assert choice.finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == expected.usage.input_tokens
    assert reply.usage.completion_tokens == expected.usage.output_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


async def test_a_stream_has_openais_chunks_and_usage_last_when_asked(
    door: str, orchestrator: Served, test_keys: ApiKeys
) -> None:
    expected = await grpc_answer(orchestrator, test_keys.acme, "stream to me", 8)

    def consume() -> list[Any]:
        with (
            sync_client(door, test_keys.acme) as api,
            api.chat.completions.create(
                model="mock-fast",
                messages=[{"role": "user", "content": "stream to me"}],
                seed=8,
                stream=True,
                stream_options={"include_usage": True},
            ) as stream,
        ):
            return list(stream)

    chunks = await asyncio.to_thread(consume)
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected.text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and set(finishes[:-1]) == {None}
    # Usage comes once, in a last chunk without choices.
    assert [c.usage is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == expected.usage.output_tokens


async def test_the_async_client_streams_too(door: str, test_keys: ApiKeys) -> None:
    async with client(door, test_keys.acme) as api:
        stream = await api.chat.completions.create(
            model="mock-fast", messages=[{"role": "user", "content": "async stream"}], stream=True
        )
        chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)  # not asked for


async def test_a_stream_cut_upstream_ends_in_an_error_never_in_done(
    door: str, test_keys: ApiKeys
) -> None:
    # What the SDK sees: part of the answer, then an error, never a finished answer.
    seen: list[Any] = []
    async with client(door, test_keys.acme) as api:
        stream = await api.chat.completions.create(
            model="mock-cut", messages=[{"role": "user", "content": "cut me off"}], stream=True
        )
        with pytest.raises(openai.APIError) as caught:
            async for chunk in stream:
                seen.append(chunk)
    assert seen and any(c.choices and c.choices[0].delta.content for c in seen)
    assert all(c.choices[0].finish_reason is None for c in seen if c.choices)
    assert "STREAM_INTERRUPTED" in str(caught.value.body) or "STREAM_INTERRUPTED" in str(
        caught.value
    )
    # On the wire: an error event, and no [DONE].
    async with (
        httpx.AsyncClient(timeout=15) as http,
        http.stream(
            "POST",
            f"{door}/chat/completions",
            headers={"authorization": f"Bearer {test_keys.acme}"},
            json={
                "model": "mock-cut",
                "messages": [{"role": "user", "content": "cut me off again"}],
                "stream": True,
            },
        ) as response,
    ):
        body = (await response.aread()).decode()
    assert response.status_code == 200
    assert "[DONE]" not in body
    assert '"finish_reason":"stop"' not in body
    assert body.rstrip().splitlines()[-1].startswith('data: {"error":')


@pytest.mark.parametrize(
    ("key", "request_body", "error", "status", "reason"),
    [
        ("bad", {"model": "mock-fast"}, openai.AuthenticationError, 401, "API_KEY_INVALID"),
        ("acme", {"model": "no-such-model"}, openai.NotFoundError, 404, "MODEL_NOT_FOUND"),
        ("acme", {"model": "mock-fast", "temperature": 9}, openai.BadRequestError, 400, None),
        ("acme", {"model": "mock-error"}, openai.InternalServerError, 503, None),
    ],
    ids=["bad-key", "unknown-model", "bad-parameter", "provider-down"],
)
async def test_errors_have_openais_shape_and_status(
    door: str,
    test_keys: ApiKeys,
    key: str,
    request_body: dict[str, Any],
    error: type[openai.APIStatusError],
    status: int,
    reason: str | None,
) -> None:
    api_key = {"acme": test_keys.acme, "bad": "sk-not-a-key"}[key]
    async with client(door, api_key) as api:
        with pytest.raises(error) as caught:
            await api.chat.completions.create(
                messages=[{"role": "user", "content": "hi"}], **request_body
            )
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and {"message", "type", "param", "code"} <= set(body)
    assert body["code"] == caught.value.response.headers["x-strata-reason"]
    if reason is not None:
        assert body["code"] == reason
    if status == 400:
        assert body["param"] == "params.temperature" or "temperature" in str(body["param"])


async def test_a_rate_limit_is_429_with_retry_after(door: str, test_keys: ApiKeys) -> None:
    async with client(door, test_keys.tight) as limited:
        with pytest.raises(openai.RateLimitError) as caught:
            for i in range(10):  # the key allows 3 requests per minute
                await limited.chat.completions.create(
                    model="mock-fast", messages=[{"role": "user", "content": f"again {i}"}]
                )
    assert caught.value.status_code == 429
    assert caught.value.code == "RATE_LIMITED"
    assert int(caught.value.response.headers["retry-after"]) >= 1


async def test_malformed_bodies_are_400_naming_the_parameter(door: str, test_keys: ApiKeys) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        auth = {"authorization": f"Bearer {test_keys.acme}"}
        not_json = await http.post(f"{door}/chat/completions", headers=auth, content=b"{")
        no_messages = await http.post(
            f"{door}/chat/completions", headers=auth, json={"model": "mock-fast"}
        )
        image = await http.post(
            f"{door}/chat/completions",
            headers=auth,
            json={
                "model": "mock-fast",
                "messages": [{"role": "user", "content": [{"type": "image_url"}]}],
            },
        )
    assert [r.status_code for r in (not_json, no_messages, image)] == [400, 400, 400]
    assert no_messages.json()["error"]["param"] == "messages"
    assert image.json()["error"]["param"] == "messages[0].content[0]"
    assert not_json.json()["error"]["type"] == "invalid_request_error"


async def test_a_body_nested_too_deep_or_too_large_is_a_client_error(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    """JSON nested 50,000 deep is 400 (not a 500 from the parser's recursion); a body over
    `max_message_bytes` is 413 REQUEST_TOO_LARGE, whether its length is declared or it
    comes in chunks (refused as it passes the limit, not read whole); one within it goes
    on."""
    running = await start(
        GatewaySettings(
            port=0,
            orchestrator_address=orchestrator.address,
            log_level="WARNING",
            max_message_bytes=64 * 1024,
        )
    )
    door = f"http://127.0.0.1:{running.port}/v1"
    auth = {"authorization": f"Bearer {test_keys.acme}"}

    def body(size: int) -> bytes:
        message = {"role": "user", "content": "x" * size}
        return json.dumps({"model": "mock-fast", "messages": [message]}).encode()

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for at in range(0, len(data), 16 * 1024):
            yield data[at : at + 16 * 1024]

    try:
        async with httpx.AsyncClient(timeout=10) as http:
            url = f"{door}/chat/completions"
            deep = await http.post(url, headers=auth, content=b"[" * 50_000)
            declared = await http.post(url, headers=auth, content=body(100 * 1024))
            streamed = await http.post(url, headers=auth, content=chunks(body(100 * 1024)))
            within = await http.post(url, headers=auth, content=body(1024))
    finally:
        await running.stop()
    assert deep.status_code == 400
    assert deep.json()["error"]["code"] == "REQUEST_INVALID"
    for refused in (declared, streamed):
        assert refused.status_code == 413
        assert refused.json()["error"]["code"] == "REQUEST_TOO_LARGE"
        assert refused.headers["x-strata-reason"] == "REQUEST_TOO_LARGE"
    assert "transfer-encoding" not in declared.request.headers
    assert streamed.request.headers["transfer-encoding"] == "chunked"
    assert within.status_code == 200
    assert within.json()["choices"][0]["message"]["content"]


async def test_grpcs_own_errors_get_a_reason_and_no_internal_address(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    """A status with no ErrorInfo is gRPC's own: an API key too long for gRPC's metadata
    limit is 413 REQUEST_TOO_LARGE (not a 429 rate limit); an orchestrator that does not
    answer is 503 ORCHESTRATOR_UNAVAILABLE with Retry-After, and gRPC's text, which names
    the address it tried, is not passed on."""
    body = {"model": "mock-fast", "messages": [{"role": "user", "content": "hi"}]}
    running = await start(
        GatewaySettings(port=0, orchestrator_address=orchestrator.address, log_level="WARNING")
    )
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            huge = await http.post(
                f"http://127.0.0.1:{running.port}/v1/chat/completions",
                headers={"authorization": "Bearer " + "k" * 20_000},
                json=body,
            )
    finally:
        await running.stop()
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    nowhere = f"127.0.0.1:{closed.getsockname()[1]}"  # bound, never listening
    running = await start(
        GatewaySettings(port=0, orchestrator_address=nowhere, log_level="WARNING")
    )
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            down = await http.post(
                f"http://127.0.0.1:{running.port}/v1/chat/completions",
                headers={"authorization": f"Bearer {test_keys.acme}"},
                json=body,
            )
    finally:
        await running.stop()
        closed.close()
    assert huge.status_code == 413
    assert huge.json()["error"]["code"] == "REQUEST_TOO_LARGE"
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "ORCHESTRATOR_UNAVAILABLE"
    assert down.headers["x-strata-reason"] == "ORCHESTRATOR_UNAVAILABLE"
    assert down.headers["retry-after"] == "1"
    assert nowhere not in down.text and "127.0.0.1" not in down.text


async def test_models_and_embeddings(door: str, test_keys: ApiKeys) -> None:
    async with client(door, test_keys.acme) as api:
        listed = [m.id async for m in api.models.list()]
        embedded = await api.embeddings.create(model="mock-embed", input=["one", "two", "three"])
        with pytest.raises(openai.BadRequestError) as caught:
            await api.embeddings.create(model="mock-fast", input="chat models do not embed")
    assert "mock-fast" in listed and "mock-embed" in listed
    assert [d.index for d in embedded.data] == [0, 1, 2]
    lengths = {len(d.embedding) for d in embedded.data}
    assert len(lengths) == 1 and lengths.pop() > 0
    assert embedded.usage.prompt_tokens > 0
    assert caught.value.code == "REQUEST_INVALID"


async def test_health(door: str) -> None:
    async with httpx.AsyncClient(timeout=5) as http:
        reply = await http.get(door.removesuffix("/v1") + "/healthz")
    assert (reply.status_code, reply.json()) == (200, {"status": "SERVING"})


async def _get_health(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One GET /healthz on an open connection; the response's status (body read)."""
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: door\r\n\r\n")
    await writer.drain()
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = next(
        int(line.split(":", 1)[1])
        for line in head.split("\r\n")
        if line.lower().startswith("content-length:")
    )
    await reader.readexactly(length)
    return int(head.split(" ", 2)[1])


async def test_idle_connections_are_kept_for_keep_alive_s(orchestrator: Served) -> None:
    # uvicorn's own default is 5 s: a door that ignored the setting would keep the
    # connection past 4.5 s, and one that used it for less would close it within 1.5 s.
    running = await start(
        GatewaySettings(
            port=0, orchestrator_address=orchestrator.address, log_level="WARNING", keep_alive_s=2
        )
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", running.port)
    try:
        assert await _get_health(reader, writer) == 200
        await asyncio.sleep(1.5)
        assert await _get_health(reader, writer) == 200  # same connection, still open
        assert await asyncio.wait_for(reader.read(), 4.5) == b""  # then closed by the door
    finally:
        writer.close()
        await running.stop()
