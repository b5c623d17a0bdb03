"""The providers' pooled HTTP client: requests built as httpx's client builds them, sent
straight to the transport, and no state carried from one call to the next."""

from __future__ import annotations

import json

import httpx
import pytest

from services.common.catalog import OpenAICompatibleProviderConfig
from services.executor.providers import http

BASE_URL = "http://upstream.test/v1"


@pytest.mark.parametrize("direct", [True, False], ids=["to-the-transport", "through-httpx"])
async def test_a_call_is_built_as_httpx_builds_it_and_no_cookie_comes_back(direct: bool) -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"n": len(seen)}, headers={"set-cookie": "route=a; Path=/"})

    config = OpenAICompatibleProviderConfig(
        kind="openai_compatible", base_url=BASE_URL, headers={"x-provider-tag": "p-1"}
    )
    upstream = http.pooled_client(
        config, {"authorization": "Bearer k"}, httpx.MockTransport(answer)
    )
    if not direct:  # as with HTTP/2, where the client makes its own transport
        upstream = http.Upstream(upstream.client, None)
    url = upstream.endpoint("chat/completions")

    replies = [
        await upstream.post(
            url, json={"q": "é"}, headers={"x-model-route": "blue"}, timeouts=httpx.Timeout(5.0)
        )
        for _ in range(2)
    ]
    async with upstream.stream(
        url, json={"q": 3}, headers={"accept": "text/event-stream"}, timeouts=httpx.Timeout(1.0)
    ) as streamed:
        assert json.loads(await streamed.aread()) == {"n": 3}
    await upstream.aclose()

    assert [r.json() for r in replies] == [{"n": 1}, {"n": 2}]
    assert [str(r.url) for r in seen] == [f"{BASE_URL}/chat/completions"] * 3
    first = seen[0].headers
    assert first["user-agent"] == "strata-executor"
    assert (first["authorization"], first["x-provider-tag"]) == ("Bearer k", "p-1")
    assert first["x-model-route"] == "blue"
    assert first["content-type"] == "application/json"
    assert json.loads(seen[0].content) == {"q": "é"}
    assert seen[0].extensions["timeout"]["read"] == 5.0
    assert seen[2].headers["accept"] == "text/event-stream"
    assert seen[2].extensions["timeout"]["read"] == 1.0
    assert all("cookie" not in r.headers for r in seen)
