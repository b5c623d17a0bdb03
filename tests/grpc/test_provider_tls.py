"""The executor's HTTP client against a real TLS upstream (hypercorn, a test CA, ALPN h2 and
http/1.1): which protocol a call takes, whose certificate it trusts, a caller leaving a
stream, the upstream retiring connections, and a proxy named in the environment."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.common.calls import Deadline
from services.common.catalog import ModelConfig, OpenAICompatibleProviderConfig
from services.common.errors import StrataError
from services.common.settings import ConfigError
from services.executor.providers.base import ProviderRequest, TextDelta
from services.executor.providers.openai_compatible import OpenAICompatibleProvider
from strata.common.v1 import common_pb2
from tests.fakes.tls_upstream import (
    PIECES,
    SLOW_MODEL,
    USAGE,
    ConnectProxy,
    TlsUpstream,
    certificates,
)
from tests.helpers import user

ANSWER = "".join(PIECES)


@pytest.fixture(scope="module")
def pem(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def upstream(pem: tuple[Path, Path, Path]) -> Iterator[TlsUpstream]:
    server = TlsUpstream(pem[1], pem[2]).start()
    try:
        yield server
    finally:
        server.stop()


def provider(base_url: str, ca_file: Path | None) -> OpenAICompatibleProvider:
    config = OpenAICompatibleProviderConfig(
        kind="openai_compatible", base_url=base_url, ca_file=ca_file
    )
    return OpenAICompatibleProvider("tls", config)


def request(n: int = 0, model: str = "tls-model") -> ProviderRequest:
    return ProviderRequest(
        model=ModelConfig(name=model, provider="tls", upstream_model=model),
        messages=[user(f"hello {n}")],
        params=common_pb2.GenerationParams(),
        max_output_tokens=64,
        deadline=Deadline.after(10),
        request_id=f"req-tls-{n}",
    )


async def streamed(client: OpenAICompatibleProvider, n: int = 0) -> str:
    text = ""
    async for event in client.stream(request(n)):
        if isinstance(event, TextDelta):
            text += event.text
    return text


async def test_a_tls_upstream_is_called_over_http1_though_it_offers_http2(
    upstream: TlsUpstream, pem: tuple[Path, Path, Path]
) -> None:
    """The certificate is checked against the provider's `ca_file`; unary and streamed
    answers arrive whole."""
    client = provider(upstream.base_url, pem[0])
    before = len(upstream.seen)
    try:
        answer = await client.complete(request())
        text = await streamed(client)
    finally:
        await client.aclose()
    assert answer.text == ANSWER
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (
        USAGE["prompt_tokens"],
        USAGE["completion_tokens"],
    )
    assert text == ANSWER
    calls = upstream.seen[before:]
    assert [(c.http_version, c.stream) for c in calls] == [("1.1", False), ("1.1", True)]


async def test_a_certificate_of_an_authority_not_trusted_is_refused(
    upstream: TlsUpstream,
) -> None:
    """Without `ca_file` the public authorities are trusted, and the test CA is not one."""
    client = provider(upstream.base_url, None)
    before = len(upstream.seen)
    try:
        with pytest.raises(StrataError) as caught:
            await client.complete(request())
    finally:
        await client.aclose()
    assert caught.value.reason == "PROVIDER_UNAVAILABLE"
    assert len(upstream.seen) == before


async def test_a_stream_its_caller_leaves_stops_at_the_upstream_at_once(
    upstream: TlsUpstream, pem: tuple[Path, Path, Path]
) -> None:
    """Cancellation reaches the upstream over TLS: leaving a stream after its first piece
    ends the upstream's answer (200 pieces, 10 s long) at once, call after call. (Over
    httpx's HTTP/2 none did, bench/provider_http.py.)"""
    client = provider(upstream.base_url, pem[0])
    try:
        for n in range(3):
            before = len(upstream.seen)
            pieces = client.stream(request(n, SLOW_MODEL))
            async for event in pieces:
                if isinstance(event, TextDelta):
                    break
            await pieces.aclose()
            left = upstream.seen[before]
            assert await asyncio.to_thread(left.gone.wait, 2)
    finally:
        await client.aclose()


def test_a_ca_file_that_cannot_be_read_stops_the_start(tmp_path: Path) -> None:
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    for ca_file in (bogus, tmp_path / "missing.pem"):
        with pytest.raises(ConfigError, match="ca_file"):
            provider("https://127.0.0.1:1/v1", ca_file)


async def test_an_upstream_retiring_its_connections_loses_no_call(
    pem: tuple[Path, Path, Path],
) -> None:
    """An upstream that closes a connection after 3 requests (nginx and hypercorn do after
    1,000): every call, 4 at a time, is answered, over several connections. (Over httpx's
    HTTP/2 some failed, bench/provider_http.py.)"""
    server = TlsUpstream(pem[1], pem[2], max_requests=3).start()
    client = provider(server.base_url, pem[0])

    async def calls(worker: int) -> list[str]:
        texts = []
        for n in range(6):
            if n % 2:
                texts.append(await streamed(client, worker * 10 + n))
            else:
                texts.append((await client.complete(request(worker * 10 + n))).text)
        return texts

    try:
        answers = await asyncio.gather(*(calls(w) for w in range(4)))
    finally:
        await client.aclose()
        server.stop()
    assert [t for texts in answers for t in texts] == [ANSWER] * 24
    connections = {c.client for c in server.seen}
    assert len(server.seen) == 24
    assert len(connections) >= 24 // 3


@pytest.mark.parametrize("bypassed", [False, True], ids=["through-the-proxy", "no-proxy"])
async def test_a_proxy_named_in_the_environment_carries_the_calls(
    upstream: TlsUpstream,
    pem: tuple[Path, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
    bypassed: bool,
) -> None:
    async with ConnectProxy() as proxy:
        for name in ("no", "http", "https", "all"):
            monkeypatch.delenv(f"{name}_proxy", raising=False)
            monkeypatch.delenv(f"{name.upper()}_PROXY", raising=False)
        monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{proxy.port}")
        if bypassed:
            monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        client = provider(upstream.base_url, pem[0])
        try:
            assert (await client.complete(request())).text == ANSWER
            assert await streamed(client) == ANSWER
        finally:
            await client.aclose()
    assert proxy.targets == ([] if bypassed else [f"127.0.0.1:{upstream.port}"])
