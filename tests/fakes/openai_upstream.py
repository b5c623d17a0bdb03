"""A real HTTP server speaking OpenAI's chat-completions API, with faults on purpose.

It runs an aiohttp server on 127.0.0.1 (port 0) in a thread of its own, so both async and
sync tests can use it. The requested model picks the behaviour; "…-once" faults hit only
the first request of a conversation (the same messages), so a retry sees a healthy server:

    fake-ok            a streamed (or unary) answer, usage in the last chunk
    fake-slow          a long stream, one chunk every 50 ms (to cancel it midway)
    fake-500           HTTP 500 with an error body
    fake-500-once      HTTP 500, then answers
    fake-429           HTTP 429 with Retry-After: 3
    fake-429-once      HTTP 429 with Retry-After: 0.2, then answers
    fake-quota         HTTP 429 with error code insufficient_quota
    fake-hang          sends the response headers, then nothing, until the client leaves
    fake-slow-first    waits 2 s before the first chunk, every time
    fake-slow-first-once  waits 2 s before the first chunk the first time, then answers
    fake-cut           a few chunks, then the connection closes with no final event
    fake-malformed     an event whose data is not JSON, before any content
    fake-no-usage      a whole answer with no usage chunk

Everything it received and sent is recorded, with when each request arrived and when its
client went away, so tests compare both ends and count attempts.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

SLOW_CHUNKS = 200
SLOW_DELAY_S = 0.05
SLOW_FIRST_S = 2.0


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
    arrived_at: float = field(default_factory=time.monotonic)
    sent: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)
    disconnected_at: float | None = None
    finished: threading.Event = field(default_factory=threading.Event)
    peer: tuple[str, int] | None = None
    """The client's address and port: requests over one kept-alive connection share it."""


class FakeOpenAI:
    """The fake server; `base_url` ends in /v1."""

    def __init__(self) -> None:
        self.exchanges: list[Exchange] = []
        self.in_flight = 0
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def calls(self, marker: str | None = None) -> list[Exchange]:
        """Requests received, all or those whose body contains `marker`."""
        with self._lock:
            return [e for e in self.exchanges if marker is None or marker in json.dumps(e.body)]

    def wait_idle(self, timeout_s: float = 5.0) -> bool:
        """True once no request handler is running (every stream was closed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.in_flight == 0:
                return True
            time.sleep(0.01)
        return False

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
        # Cancel a handler as soon as its client goes away, so disconnects are seen at once.
        self._runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]

    def _seen_before(self, exchange: Exchange) -> int:
        """How many earlier requests had the same model and messages."""
        key = (exchange.body.get("model"), json.dumps(exchange.body.get("messages")))
        with self._lock:
            return sum(
                1
                for e in self.exchanges
                if e is not exchange
                and (e.body.get("model"), json.dumps(e.body.get("messages"))) == key
            )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        exchange = Exchange(body=body, headers=dict(request.headers), peer=peer)
        with self._lock:
            self.exchanges.append(exchange)
            self.in_flight += 1
        try:
            return await self._answer(request, exchange)
        except (ConnectionResetError, asyncio.CancelledError):
            exchange.disconnected_at = time.monotonic()
            exchange.disconnected.set()
            raise
        finally:
            with self._lock:
                self.in_flight -= 1
            exchange.finished.set()

    async def _answer(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        body = exchange.body
        model = str(body.get("model"))
        first_time = self._seen_before(exchange) == 0
        if model == "fake-500" or (model == "fake-500-once" and first_time):
            return _error(500, "server_error", "boom")
        if model == "fake-429":
            return _error(429, "rate_limit_error", "slow down", {"retry-after": "3"})
        if model == "fake-429-once" and first_time:
            return _error(429, "rate_limit_error", "slow down", {"retry-after": "0.2"})
        if model == "fake-quota":
            return _error(429, "insufficient_quota", "pay up")
        pieces = answer_pieces(body)
        if model == "fake-slow":
            pieces = [f" slow{i}" for i in range(SLOW_CHUNKS)]
        usage = usage_of(body, pieces)
        if not body.get("stream"):
            exchange.sent = pieces
            exchange.usage = usage
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
                    "usage": None if model == "fake-no-usage" else usage,
                }
            )
        return await self._stream(request, exchange, model, pieces, usage, first_time)

    async def _stream(
        self,
        request: web.Request,
        exchange: Exchange,
        model: str,
        pieces: list[str],
        usage: dict[str, int],
        first_time: bool,
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

        if model == "fake-hang":
            await asyncio.Event().wait()
        if model == "fake-slow-first" or (model == "fake-slow-first-once" and first_time):
            await asyncio.sleep(SLOW_FIRST_S)
        await event(chunk({"role": "assistant", "content": ""}))
        if model == "fake-malformed":
            await event("{not json")
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
        if model != "fake-no-usage":
            await event({**chunk({}), "choices": [], "usage": usage})
            exchange.usage = usage
        await event("[DONE]")
        await response.write_eof()
        return response


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response(
        {"error": {"message": message, "type": code, "code": code}}, status=status, headers=headers
    )
