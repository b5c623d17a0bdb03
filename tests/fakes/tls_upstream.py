"""A real TLS upstream speaking OpenAI's chat-completions API, HTTP/1.1 and HTTP/2, and a real
forward proxy (HTTP CONNECT) in front of it.

The upstream is hypercorn (ASGI) in a thread of its own, on 127.0.0.1, with a certificate
from a test certificate authority (trustme) and ALPN offering h2 and http/1.1, so the
client's TLS and protocol choices are the real ones. It answers every chat request with the
same short answer (unary, or streamed as server-sent events, usage last) and records each
request's HTTP version and client address (calls on one kept-alive connection share it). The
model `tls-slow` gets a long stream instead (a piece every 50 ms, for 10 s), and whether its
client went away before the end is recorded; `GET /stats` counts those streams and those
left.
`max_requests` retires a connection after that many requests, as nginx and hypercorn do
(1,000 by default): over HTTP/1.1 with `Connection: close`, over HTTP/2 with a GOAWAY.

The proxy relays each CONNECT tunnel byte for byte and records the targets it was asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from hypercorn.asyncio import serve
from hypercorn.config import Config

PIECES = ["Over", " TLS", " it", " came"]
SLOW_MODEL = "tls-slow"
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}


@dataclass(frozen=True)
class Seen:
    """One chat request as the upstream saw it."""

    http_version: str
    client: tuple[str, int]
    stream: bool
    slow: bool = False
    gone: threading.Event = field(default_factory=threading.Event, compare=False)
    """Set when the client went away before the answer's end."""


def certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A new test CA and a certificate it signed for 127.0.0.1: (CA file, cert chain, key)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    paths = (directory / "ca.pem", directory / "server.pem", directory / "server.key")
    ca.cert_pem.write_to_path(str(paths[0]))
    cert.private_key_and_cert_chain_pem.write_to_path(str(paths[1]))
    cert.private_key_pem.write_to_path(str(paths[2]))
    return paths


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-tls",
        "object": "chat.completion.chunk",
        "model": "tls-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


class TlsUpstream:
    """The upstream; `base_url` ends in /v1."""

    def __init__(self, certfile: Path, keyfile: Path, max_requests: int = 1000) -> None:
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        listening = socket.create_server(("127.0.0.1", 0))
        self.port = listening.getsockname()[1]
        self._config = Config()
        # hypercorn takes the socket over, and closes it when it stops.
        self._config.bind = [f"fd://{listening.detach()}"]
        self._config.certfile, self._config.keyfile = str(certfile), str(keyfile)
        self._config.alpn_protocols = ["h2", "http/1.1"]
        self._config.keep_alive_max_requests = max_requests
        self._config.accesslog = None
        self._config.errorlog = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._stop: asyncio.Event | None = None
        self._serving: asyncio.Future[None] | None = None

    @property
    def base_url(self) -> str:
        return f"https://127.0.0.1:{self.port}/v1"

    def start(self) -> TlsUpstream:
        self._thread.start()

        async def begin() -> None:
            self._stop = asyncio.Event()
            self._serving = asyncio.ensure_future(
                serve(self._app, self._config, shutdown_trigger=self._stop.wait)  # type: ignore[arg-type]
            )

        asyncio.run_coroutine_threadsafe(begin(), self._loop).result(10)
        return self

    def stop(self) -> None:
        async def end() -> None:
            assert self._stop is not None and self._serving is not None
            self._stop.set()
            await asyncio.wait_for(self._serving, 10)

        asyncio.run_coroutine_threadsafe(end(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/stats":  # for a benchmark in another process
            with self._lock:
                long = [c for c in self.seen if c.slow]
            stats = {"slow": len(long), "gone": sum(c.gone.is_set() for c in long)}
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": json.dumps(stats).encode()})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        stream = bool(request.get("stream"))
        slow = stream and request.get("model") == SLOW_MODEL
        seen = Seen(scope["http_version"], tuple(scope["client"]), stream, slow)
        with self._lock:
            self.seen.append(seen)
        if slow:
            await self._slow(receive, send, seen)
            return
        if not stream:
            answer = {
                "id": "cmpl-tls",
                "object": "chat.completion",
                "model": "tls-model",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "".join(PIECES)},
                        "finish_reason": "stop",
                    }
                ],
                "usage": USAGE,
            }
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return
        events = [_event(_chunk({"role": "assistant", "content": ""}))]
        events += [_event(_chunk({"content": piece})) for piece in PIECES]
        events += [
            _event(_chunk({}, "stop")),
            _event({**_chunk({}), "choices": [], "usage": USAGE}),
            _event("[DONE]"),
        ]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for data in events:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _slow(self, receive: Any, send: Any, seen: Seen) -> None:
        async def pieces() -> None:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")],
                }
            )
            for n in range(200):
                data = _event(_chunk({"content": f" slow{n}"}))
                await send({"type": "http.response.body", "body": data, "more_body": True})
                await asyncio.sleep(0.05)
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        sending = asyncio.ensure_future(pieces())
        # hypercorn tells of a client gone only through `receive`.
        while (await receive())["type"] != "http.disconnect":
            pass
        if not sending.done():
            seen.gone.set()
        sending.cancel()
        with contextlib.suppress(BaseException):
            await sending


class ConnectProxy:
    """A forward proxy for HTTPS: answers CONNECT host:port and relays the tunnel. Runs on the
    caller's event loop (`async with`)."""

    def __init__(self) -> None:
        self.targets: list[str] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._tunnel, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.targets.append(target)
            host, port = target.rsplit(":", 1)
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            await writer.drain()

            async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
                try:
                    while data := await source.read(65536):
                        sink.write(data)
                        await sink.drain()
                finally:
                    sink.close()

            await asyncio.gather(
                pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True
            )
        except (OSError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            writer.close()
