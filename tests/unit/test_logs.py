"""Service logs: one line per event of ours, not one per HTTP call a library makes."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import httpx
import pytest

from services.common import logs


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    httpx_level = logging.getLogger("httpx").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("httpx").setLevel(httpx_level)


async def one_call() -> None:
    answer = httpx.MockTransport(lambda request: httpx.Response(200, json={}))
    async with httpx.AsyncClient(transport=answer) as client:
        await client.post("http://upstream.test/v1/chat/completions", json={})


@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("WARNING", False), ("DEBUG", True)])
async def test_httpx_request_lines_show_only_at_debug(
    capsys: pytest.CaptureFixture[str], level: str, shown: bool
) -> None:
    logs.configure("executor", level)
    logs.bind_request_id("r-1")

    await one_call()
    logging.getLogger("services.executor").warning("provider slow")

    err = capsys.readouterr().err
    assert ("HTTP Request: POST http://upstream.test/v1/chat/completions" in err) is shown
    assert "WARNING executor r-1 services.executor: provider slow" in err
