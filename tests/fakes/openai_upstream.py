"""A real HTTP server speaking OpenAI's chat-completions API, for the tests that need an upstream.

It runs an aiohttp server on 127.0.0.1 (port 0) in a thread of its own, so both async and
sync tests can use it. The requested model picks the behaviour:

    fake-ok       a streamed (or unary) answer, usage in the last chunk
    fake-slow     a long stream, one chunk every 50 ms (to cancel it midway)
    fake-500      HTTP 500 with an error body
    fake-429      HTTP 429 with Retry-After: 3
    fake-cut      a few chunks, then the connection closes with no final event

Everything it received and sent is recorded so tests compare both ends.
"""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SLOW_CHUNKS = 200
SLOW_DELAY_S = 0.05


def answer_pieces(body: dict[str, Any]) -> list[str]:
    """The deterministic pieces of the answer to a request."""
    last = body["messages"][-1]["content"]
    words = [f"Upstream{i}" for i in range(1, 6)] + last.split()[:5]
    return [words[0]] + [f" {w}" for w in words[1:]]


def usage_of(body: dict[str, Any], pieces: list[str]) -> dict[str, int]:
    """Usage the fake reports: not derivable from Strata's own estimates."""
    prompt = 7 + sum(len(m["content"]) for m in body["messages"])
    return {"prompt_tokens": prompt, "completion_tokens": len(pieces) * 3, "total_tokens": 0}


@dataclass
class Exchange:
    """One request the fake received and what it sent back."""

    body: dict[str, Any]
    headers: dict[str, str]
    sent: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)


class FakeOpenAI:
    """The fake server; `base_url` ends in /v1."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def calls(self, model: str | None = None) -> list[Exchange]:
        with self._lock:
            return [e for e in self.exchanges if model is None or e.body.get("model") == model]

    def start(self) -> FakeOpenAI:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        exchange = Exchange(body=body, headers=dict(request.headers))
        with self._lock:
            self.exchanges.append(exchange)
        model = body.get("model")
        if model == "fake-500":
            exchange.finished.set()
            return web.json_response(
                {"error": {"message": "boom", "type": "server_error"}}, status=500
            )
        if model == "fake-429":
            exchange.finished.set()
            return web.json_response(
                {"error": {"message": "slow down", "type": "rate_limit_error"}},
                status=429,
                headers={"retry-after": "3"},
            )
        pieces = answer_pieces(body)
        if model == "fake-slow":
            pieces = [f" slow{i}" for i in range(SLOW_CHUNKS)]
        usage = usage_of(body, pieces)
        if not body.get("stream"):
            exchange.sent = pieces
            exchange.usage = usage
            exchange.finished.set()
            return web.json_response(
                {
                    "id": "cmpl-fake",
                    "object": "chat.completion",
                    "model": f"{model}-2026",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(pieces)},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": usage,
                }
            )
        return await self._stream(request, exchange, model, pieces, usage)

    async def _stream(
        self,
        request: web.Request,
        exchange: Exchange,
        model: str,
        pieces: list[str],
        usage: dict[str, int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)

        async def event(payload: object) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload)
            await response.write(f"data: {data}\n\n".encode())

        def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
            return {
                "id": "cmpl-fake",
                "object": "chat.completion.chunk",
                "model": f"{model}-2026",
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }

        try:
            await event(chunk({"role": "assistant", "content": ""}))
            for i, piece in enumerate(pieces):
                if model == "fake-cut" and i == 3:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if model == "fake-slow" and i:
                    await asyncio.sleep(SLOW_DELAY_S)
                await event(chunk({"content": piece}))
                exchange.sent.append(piece)
            await event(chunk({}, "stop"))
            await event({**chunk({}), "choices": [], "usage": usage})
            exchange.usage = usage
            await event("[DONE]")
            await response.write_eof()
        except ConnectionResetError:
            exchange.disconnected.set()
        except asyncio.CancelledError:
            exchange.disconnected.set()
            raise
        finally:
            exchange.finished.set()
        return response
