"""What one gRPC hop between two Strata processes costs, and what the server's plumbing adds.

    .venv/bin/python -m bench.grpc_hop [--calls 3000] [--rounds 3] [--client]

A server process serves an echo method (unary, and a stream of `--chunks` messages) four
ways: bare grpc.aio; with the tracing and in-flight bound as grpc.aio server interceptors
(how Strata served before: each call awaited by each interceptor, its handler rebuilt);
with the same two wrapped once per method (services.common.interception, how it serves
now); and that on uvloop (services.common.loops). A client in this process, on the same
loop kind as the server, makes the calls one at a time. Per configuration: median round
trip, and CPU microseconds per call of the client and of the server (from /proc).
Medians over `--rounds` rounds; the configurations take turns within each round. Both
processes run the services' gRPC transport (services/__init__.py); `GRPC_EXPERIMENTS=`
(empty) measures grpc's default one instead.

`--client` compares the caller's side instead, against the server as it serves now, each
call made under a span and carrying the trace context and an internal token: added by two
grpc.aio client interceptors (how Strata's channels did it before), or as each call is
made (services.common.calls.CallerChannel, how they do it now).
"""

from __future__ import annotations

# Both ends of the hop are Strata processes: importing `services` first gives this one the
# gRPC transport the services run on (services/__init__.py), as the server process gets it.
import services  # noqa: F401

# isort: split
import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from bench import procs
from services.common import interception, limits, loops, security, telemetry
from services.common.calls import CallerChannel

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("bare", "interceptors", "wrapped", "wrapped+uvloop")
CLIENTS = ("client-interceptors", "caller-channel")
TOKEN = "bench-internal-token"


def _handlers(chunks: int) -> grpc.GenericRpcHandler:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    async def pieces(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for _ in range(chunks):
            yield request

    return grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Echo": grpc.unary_unary_rpc_method_handler(
                echo, request_deserializer=bytes, response_serializer=bytes
            ),
            "Pieces": grpc.unary_stream_rpc_method_handler(
                pieces, request_deserializer=bytes, response_serializer=bytes
            ),
        },
    )


class _Interceptor(grpc.aio.ServerInterceptor):
    """A wrapper applied per call, the way a grpc.aio server interceptor works."""

    def __init__(self, wrap: interception.Wrap) -> None:
        self._wrap = wrap

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        return None if handler is None else self._wrap(details.method, handler)


async def serve(config: str, port_file: Path, chunks: int) -> None:
    limit = limits.inflight_limit(None, True, 0.8, 1.0)
    counting, tracing = limits.counting(limit), telemetry.server_tracing("bench")
    interceptors = (
        [_Interceptor(counting), _Interceptor(tracing)] if config == "interceptors" else None
    )
    server = grpc.aio.server(interceptors=interceptors)
    if config.startswith("wrapped"):
        wrapped = interception.WrappingServer(server, interception.chain(counting, tracing))
        wrapped.add_generic_rpc_handlers((_handlers(chunks),))
    else:
        server.add_generic_rpc_handlers((_handlers(chunks),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(port_file.write_text, str(port))
    await server.wait_for_termination()


def _details(details: Any, add: Callable[[list[Any]], list[Any]]) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*add(list(details.metadata or ())))
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


# (grpc.aio files an interceptor under its first matching kind only: one class per kind.)
class _UnaryUnaryAdding(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, add: Callable[[list[Any]], list[Any]]) -> None:
        self._add = add

    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_details(details, self._add), request)


class _UnaryStreamAdding(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, add: Callable[[list[Any]], list[Any]]) -> None:
        self._add = add

    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_details(details, self._add), request)


def _client_channel(address: str, client: str | None) -> grpc.aio.Channel:
    if client == "caller-channel":
        return CallerChannel(grpc.aio.insecure_channel(address), TOKEN)
    if client == "client-interceptors":
        adds = (
            lambda metadata: [*metadata, (security.INTERNAL_TOKEN_KEY, TOKEN)],
            telemetry.inject_metadata,
        )
        interceptors = [
            kind(add) for add in adds for kind in (_UnaryUnaryAdding, _UnaryStreamAdding)
        ]
        return grpc.aio.insecure_channel(address, interceptors=interceptors)
    return grpc.aio.insecure_channel(address)


async def drive(port: int, calls: int, chunks: int, client: str | None) -> dict[str, float]:
    span = TracerProvider().get_tracer("bench").start_span("caller") if client else None
    with trace.use_span(span) if span is not None else contextlib.nullcontext():
        return await _drive(port, calls, chunks, client)


async def _drive(port: int, calls: int, chunks: int, client: str | None) -> dict[str, float]:
    async with _client_channel(f"127.0.0.1:{port}", client) as channel:
        echo = channel.unary_unary("/bench.Echo/Echo")
        pieces = channel.unary_stream("/bench.Echo/Pieces")
        metadata = (("x-request-id", "bench"),)
        for _ in range(200):
            await echo(b"warm", metadata=metadata, timeout=5)
        out: dict[str, float] = {}
        for kind in ("unary", "stream"):
            latencies = []
            n = calls if kind == "unary" else max(1, calls // chunks)
            cpu = time.process_time()
            for _ in range(n):
                started = time.perf_counter()
                if kind == "unary":
                    await echo(b"x" * 200, metadata=metadata, timeout=5)
                else:
                    async for _piece in pieces(b"x" * 40, metadata=metadata, timeout=5):
                        pass
                latencies.append(time.perf_counter() - started)
            out[f"{kind}_p50_us"] = statistics.median(latencies) * 1e6
            out[f"{kind}_client_cpu_us"] = (time.process_time() - cpu) / n * 1e6
            out[f"{kind}_n"] = n
        return out


def one(
    config: str, calls: int, chunks: int, work: Path, client: str | None = None
) -> dict[str, float]:
    port_file = work / f"{config}.port"
    port_file.unlink(missing_ok=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "bench.grpc_hop", "--serve", config, "--port-file", str(port_file),
         "--chunks", str(chunks)],
        cwd=ROOT,
    )  # fmt: skip
    try:
        while not port_file.exists():
            if server.poll() is not None:
                raise RuntimeError(f"the {config} server did not start")
            time.sleep(0.02)
        time.sleep(0.2)
        port = int(port_file.read_text())
        kind: loops.Kind = "uvloop" if config.endswith("uvloop") else "asyncio"
        before = procs.cpu_seconds([server.pid])
        # The server's CPU is read once for both kinds; split by calls made below.
        result = loops.run(drive(port, calls, chunks, client), kind)
        spent = procs.cpu_seconds([server.pid]) - before
    finally:
        server.terminate()
        server.wait(10)
    messages = result["unary_n"] + result["stream_n"] * chunks
    result["server_cpu_us_per_message"] = spent / messages * 1e6
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client", action="store_true", help="compare the caller's side")
    parser.add_argument("--serve", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        kind: loops.Kind = "uvloop" if args.serve.endswith("uvloop") else "asyncio"
        with contextlib.suppress(KeyboardInterrupt):
            loops.run(serve(args.serve, args.port_file, args.chunks), kind)
        return 0
    work = ROOT / "bench" / ".work" / "grpc-hop"
    work.mkdir(parents=True, exist_ok=True)
    compared = CLIENTS if args.client else CONFIGS
    rounds: dict[str, list[dict[str, float]]] = {c: [] for c in compared}
    for number in range(args.rounds):
        order = compared[number % len(compared) :] + compared[: number % len(compared)]
        for name in order:
            print(f"==> round {number + 1}/{args.rounds}: {name}", file=sys.stderr)
            if args.client:
                result = one("wrapped+uvloop", args.calls, args.chunks, work, name)
            else:
                result = one(name, args.calls, args.chunks, work)
            rounds[name].append(result)
    columns = (
        "unary_p50_us", "unary_client_cpu_us", "stream_p50_us", "stream_client_cpu_us",
        "server_cpu_us_per_message",
    )  # fmt: skip
    print(f"\n| configuration | {' | '.join(columns)} |")
    print(f"|---|{'---|' * len(columns)}")
    for name in compared:
        cells = [f"{statistics.median(r[c] for r in rounds[name]):.0f}" for c in columns]
        print(f"| {name} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
