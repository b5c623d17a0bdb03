"""A fast local upstream speaking OpenAI's chat-completions API, for the overhead benchmark.

    .venv/bin/python -m bench.upstream [--port 0] [--port-file F] [--chunks 20] [--chunk-delay-ms 0]

Answers `POST /v1/chat/completions` unary or streamed (server-sent events, usage in a last
chunk when `stream_options.include_usage`) with a deterministic answer: `--chunks` pieces,
`--first-delay-ms` before the first one and `--chunk-delay-ms` between the next ones. A
model named `bench-c<chunks>-d<delay ms>` overrides both for its requests, so one upstream
serves several shapes. `GET /stats` counts the chat requests served (the benchmark checks
that a cache hit never reached the upstream); `GET /health` answers 200.

It runs as a process of its own (one event loop, keep-alive on), so the benchmark can
measure its CPU apart from the gateways' and call it directly as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

_SHAPE = re.compile(r"^bench-c(\d+)-d(\d+)$")


@dataclass(frozen=True)
class Shape:
    """How an answer is cut and paced."""

    chunks: int
    """Pieces of the answer (stream chunks carrying content)."""
    first_delay_s: float
    """Wait before the first piece (time to first token of the upstream itself)."""
    chunk_delay_s: float
    """Wait between two pieces."""


def shape_of(model: str, default: Shape) -> Shape:
    """The shape a model name asks for (`bench-c20-d5`: 20 chunks, 5 ms apart), else `default`."""
    found = _SHAPE.match(model)
    if found is None:
        return default
    return Shape(int(found[1]), default.first_delay_s, int(found[2]) / 1000)


def answer_pieces(body: dict[str, Any], chunks: int) -> list[str]:
    """The deterministic pieces of the answer: `chunks` words depending on the last message."""
    messages = body.get("messages") or [{}]
    last = str(messages[-1].get("content") or "")
    seed = sum(last.encode()) % 997
    return [f"w{(seed + i) % 1000}" if i == 0 else f" w{(seed + i) % 1000}" for i in range(chunks)]


class Upstream:
    """The handlers, and how many chat requests arrived."""

    def __init__(self, default: Shape) -> None:
        self.default = default
        self.served = 0
        self.streamed = 0

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.served += 1
        model = str(body.get("model") or "bench")
        shape = shape_of(model, self.default)
        pieces = answer_pieces(body, shape.chunks)
        prompt_tokens = sum(len(str(m.get("content") or "")) // 4 + 1 for m in body["messages"])
        usage = {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": len(pieces),
            "total_tokens": prompt_tokens + len(pieces),
        }
        ident = f"chatcmpl-{self.served}"
        created = int(time.time())
        if not body.get("stream"):
            if shape.first_delay_s:
                await asyncio.sleep(shape.first_delay_s)
            if shape.chunk_delay_s and len(pieces) > 1:
                await asyncio.sleep(shape.chunk_delay_s * (len(pieces) - 1))
            return web.json_response(
                {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "".join(pieces)},
                            "finish_reason": "stop",
                            "logprobs": None,
                        }
                    ],
                    "usage": usage,
                }
            )
        self.streamed += 1
        response = web.StreamResponse(
            headers={"content-type": "text/event-stream", "cache-control": "no-cache"}
        )
        await response.prepare(request)

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

        await response.write(event({"role": "assistant", "content": ""}))
        for i, piece in enumerate(pieces):
            delay = shape.first_delay_s if i == 0 else shape.chunk_delay_s
            if delay:
                await asyncio.sleep(delay)
            await response.write(event({"content": piece}))
        await response.write(event({}, "stop"))
        if (body.get("stream_options") or {}).get("include_usage"):
            tail = {
                "id": ident,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": [],
                "usage": usage,
            }
            await response.write(b"data: " + json.dumps(tail).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": "bench", "object": "model", "owned_by": "bench"}]}
        )

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response({"served": self.served, "streamed": self.streamed})

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/health", self.health)
        return app


async def serve(host: str, port: int, port_file: Path | None, default: Shape) -> None:
    runner = web.AppRunner(Upstream(default).app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = int(runner.addresses[0][1])
    if port_file is not None:
        tmp = port_file.with_name(f".{port_file.name}.tmp")
        tmp.write_text(f"{bound}\n")
        tmp.replace(port_file)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", type=Path, help="where to write the bound port")
    parser.add_argument("--chunks", type=int, default=20, help="pieces of each answer")
    parser.add_argument("--first-delay-ms", type=float, default=0.0)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    args = parser.parse_args()
    default = Shape(args.chunks, args.first_delay_ms / 1000, args.chunk_delay_ms / 1000)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.host, args.port, args.port_file, default))


if __name__ == "__main__":
    main()
