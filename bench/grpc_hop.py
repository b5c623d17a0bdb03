"""What one gRPC hop between two Strata processes costs, and what the server's plumbing adds.

    .venv/bin/python -m bench.grpc_hop [--calls 3000] [--rounds 3]

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
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from bench import procs
from services.common import interception, limits, loops, telemetry

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ("bare", "interceptors", "wrapped", "wrapped+uvloop")


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


async def drive(port: int, calls: int, chunks: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
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


def one(config: str, calls: int, chunks: int, work: Path) -> dict[str, float]:
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
        result = loops.run(drive(port, calls, chunks), kind)
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
    rounds: dict[str, list[dict[str, float]]] = {c: [] for c in CONFIGS}
    for number in range(args.rounds):
        order = CONFIGS[number % len(CONFIGS) :] + CONFIGS[: number % len(CONFIGS)]
        for config in order:
            print(f"==> round {number + 1}/{args.rounds}: {config}", file=sys.stderr)
            rounds[config].append(one(config, args.calls, args.chunks, work))
    columns = (
        "unary_p50_us", "unary_client_cpu_us", "stream_p50_us", "stream_client_cpu_us",
        "server_cpu_us_per_message",
    )  # fmt: skip
    print(f"\n| configuration | {' | '.join(columns)} |")
    print(f"|---|{'---|' * len(columns)}")
    for config in CONFIGS:
        cells = [f"{statistics.median(r[c] for r in rounds[config]):.0f}" for c in columns]
        print(f"| {config} | {' | '.join(cells)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
