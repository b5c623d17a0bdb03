"""The providers' pooled HTTP client: requests built as httpx's client builds them, sent
straight to the transport, and no state carried from one call to the next."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import yaml

from services.common.catalog import OpenAICompatibleProviderConfig, load_catalog
from services.common.settings import ConfigError
from services.executor.providers import http
from tests.conftest import ROOT

BASE_URL = "http://upstream.test/v1"


async def test_a_call_is_built_as_httpx_builds_it_and_no_cookie_comes_back() -> None:
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
    assert (first["accept"], first["accept-encoding"]) == ("*/*", "gzip, deflate")
    assert (first["authorization"], first["x-provider-tag"]) == ("Bearer k", "p-1")
    assert first["x-model-route"] == "blue"
    assert first["content-type"] == "application/json"
    assert json.loads(seen[0].content) == {"q": "é"}
    assert seen[0].extensions["timeout"]["read"] == 5.0
    assert seen[2].headers["accept"] == "text/event-stream"
    assert seen[2].extensions["timeout"]["read"] == 1.0
    assert all("cookie" not in r.headers for r in seen)


def test_a_models_file_asking_for_http2_is_refused_at_start(tmp_path: Path) -> None:
    """httpx's HTTP/2 neither stops an upstream's answer its caller left nor frees the stream
    (bench/provider_http.py): a file that asks for it does not load, one that says
    `http2: false` does."""
    catalog = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())
    catalog["providers"]["secure"] = {
        "kind": "openai_compatible",
        "base_url": "https://llm.internal/v1",
        "http2": True,
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    with pytest.raises(ConfigError, match="HTTP/2 is not supported"):
        load_catalog(path)
    catalog["providers"]["secure"]["http2"] = False
    path.write_text(yaml.safe_dump(catalog))
    assert "secure" in load_catalog(path).providers
