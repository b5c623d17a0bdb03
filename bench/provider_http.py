"""Why the executor calls TLS providers over HTTP/1.1: what a call costs, and what breaks,
over its HTTP/1.1 transport and over httpx's HTTP/2.

    .venv/bin/python -m bench.provider_http [--calls 1600] [--rounds 3] [--concurrency 1,16]

A TLS upstream speaking OpenAI's chat completions (tests/fakes/tls_upstream.py: hypercorn,
a test certificate authority, ALPN offering h2 and http/1.1) runs as a process of its own,
retiring a connection after `--max-requests` requests as nginx and hypercorn do (1,000 by
default). In this process, on uvloop as the executor runs, the executor's OpenAI-compatible
provider makes `--calls` calls per configuration, `--concurrency` at a time, unary and
streamed (4 pieces, usage last), over its own transport (HTTP/1.1 over aiohttp) and over
httpx's HTTP/2 transport (httpcore, h2: how the executor called TLS upstreams until
2026-11-28). Configurations take turns within each round. Per configuration, medians over
`--rounds` rounds: CPU microseconds of this process per call, calls per second, and the
calls that failed (summed over rounds, with their reasons).

Then, per protocol, `--leaves` streams of a 10-second answer, one after another, each left
by its caller after the first piece (a cancelled request): how many the upstream saw end
early (its answer stopped, and its billing with it), and how many later calls failed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from services.common import loops
from services.common.calls import Deadline
from services.common.catalog import ModelConfig, OpenAICompatibleProviderConfig
from services.common.errors import StrataError
from services.executor.providers.base import ProviderRequest, TextDelta
from services.executor.providers.http import tls_context
from services.executor.providers.openai_compatible import OpenAICompatibleProvider
from strata.common.v1 import common_pb2

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "provider-http"
PROTOCOLS = {"http/1.1": False, "http/2": True}
SLOW_MODEL = "tls-slow"  # tests/fakes/tls_upstream.py: a piece every 50 ms for 10 s


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1600, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--max-requests", type=int, default=1000)
    parser.add_argument("--leaves", type=int, default=120, help="streams left, per protocol")
    parser.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.levels = [int(c) for c in args.concurrency.split(",")]
    if args.rounds < 1 or args.calls < 1 or min(args.levels) < 1:
        parser.error("--calls, --rounds and each concurrency level must be positive")
    return args


def serve(directory: Path, max_requests: int) -> None:
    """The upstream process: serves until SIGTERM; its port goes to `directory`/port."""
    from tests.fakes.tls_upstream import TlsUpstream

    # Blocked before the server's thread starts, so that thread inherits the mask too.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = TlsUpstream(directory / "server.pem", directory / "server.key", max_requests)
    server.start()
    (directory / "port.tmp").write_text(str(server.port))
    (directory / "port.tmp").rename(directory / "port")
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    server.stop()


def request(n: int, model: str = "tls-model") -> ProviderRequest:
    return ProviderRequest(
        model=ModelConfig(name=model, provider="tls", upstream_model=model),
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=f"question {n}")],
        params=common_pb2.GenerationParams(),
        max_output_tokens=64,
        deadline=Deadline.after(30),
        request_id=f"bench-{n}",
    )


async def one(provider: OpenAICompatibleProvider, stream: bool, n: int) -> None:
    if not stream:
        await provider.complete(request(n))
        return
    async for _ in provider.stream(request(n)):
        pass


def provider(base_url: str, ca_file: Path, http2: bool, level: int) -> OpenAICompatibleProvider:
    """The executor's provider, over its own transport or over httpx's HTTP/2 one."""
    config = OpenAICompatibleProviderConfig(
        kind="openai_compatible", base_url=base_url, ca_file=ca_file, max_connections=level
    )
    transport = None
    if http2:
        transport = httpx.AsyncHTTPTransport(
            http2=True,
            verify=tls_context(config),
            limits=httpx.Limits(max_connections=level, max_keepalive_connections=level),
        )
    return OpenAICompatibleProvider("tls", config, transport)


async def measure(
    base_url: str, ca_file: Path, http2: bool, stream: bool, level: int, args: argparse.Namespace
) -> tuple[float, float, collections.Counter[str]]:
    """(CPU µs per call, calls per second, failures by reason) of one configuration."""
    client = provider(base_url, ca_file, http2, level)
    failures: collections.Counter[str] = collections.Counter()

    async def worker(calls: int, offset: int) -> None:
        for n in range(calls):
            try:
                await one(client, stream, offset + n)
            except StrataError as err:
                failures[err.reason] += 1

    try:
        await asyncio.gather(*(worker(args.warmup // level + 1, 0) for _ in range(level)))
        failures.clear()
        per_worker = args.calls // level
        cpu, wall = time.process_time(), time.perf_counter()
        await asyncio.gather(*(worker(per_worker, w * per_worker) for w in range(level)))
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    finally:
        await client.aclose()
    calls = per_worker * level
    return cpu / calls * 1e6, calls / wall, failures


async def run(base_url: str, ca_file: Path, args: argparse.Namespace) -> None:
    cells: dict[tuple[str, int, str], list[tuple[float, float]]] = collections.defaultdict(list)
    failed: dict[tuple[str, int, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for round_ in range(1, args.rounds + 1):
        for shape in ("unary", "stream"):
            for level in args.levels:
                for protocol, http2 in PROTOCOLS.items():
                    cpu, rate, failures = await measure(
                        base_url, ca_file, http2, shape == "stream", level, args
                    )
                    cells[shape, level, protocol].append((cpu, rate))
                    failed[shape, level, protocol].update(failures)
                    print(
                        f"[round {round_}/{args.rounds}] {shape:6} c={level:<3} {protocol:8} "
                        f"CPU {cpu:7.1f} µs/call {rate:8.1f} calls/s "
                        f"failed {sum(failures.values())}",
                        file=sys.stderr,
                        flush=True,
                    )
    print(
        f"\n{args.calls} calls per configuration and round, {args.rounds} rounds (medians); "
        f"the upstream retires a connection after {args.max_requests} requests\n"
    )
    print("| call | c | protocol | CPU µs/call | calls/s | CPU against HTTP/1.1 | failed |")
    print("|---|---:|---|---:|---:|---:|---|")
    for (shape, level, protocol), values in cells.items():
        cpu = statistics.median(v[0] for v in values)
        rate = statistics.median(v[1] for v in values)
        base = statistics.median(v[0] for v in cells[shape, level, "http/1.1"])
        failures = failed[shape, level, protocol]
        total = args.calls // level * level * args.rounds
        reasons = ", ".join(f"{n} {reason}" for reason, n in failures.items())
        print(
            f"| {shape} | {level} | {protocol} | {cpu:.0f} | {rate:.0f} | {cpu / base:.2f}× | "  # noqa: RUF001
            f"{sum(failures.values())}/{total}{f' ({reasons})' if reasons else ''} |"
        )
    print(f"\n{args.leaves} streams of a 10 s answer, each left after its first piece\n")
    print("| protocol | streams left | seen ending early by the upstream | calls failed |")
    print("|---|---:|---:|---:|")
    for protocol, http2 in PROTOCOLS.items():
        left, gone, lost = await leave(base_url, ca_file, http2, args.leaves)
        print(f"| {protocol} | {left} | {gone} | {lost} |")


async def leave(base_url: str, ca_file: Path, http2: bool, count: int) -> tuple[int, int, int]:
    """(streams left, of them seen ending early by the upstream, later calls failed)."""
    stats_url = base_url.removesuffix("/v1") + "/stats"
    async with httpx.AsyncClient(
        verify=tls_context(
            OpenAICompatibleProviderConfig(
                kind="openai_compatible", base_url=base_url, ca_file=ca_file
            )
        )
    ) as plain:
        before = (await plain.get(stats_url)).json()
        client = provider(base_url, ca_file, http2, 1)
        left = failed = 0
        try:
            for n in range(count):
                try:
                    pieces = client.stream(request(n, SLOW_MODEL))
                    async for event in pieces:
                        if isinstance(event, TextDelta):
                            break
                    await pieces.aclose()
                    left += 1
                except StrataError:
                    failed += 1
            await asyncio.sleep(1.0)  # for the last ones to reach the upstream
            # Read before the client closes its connections, which ends every stream.
            after = (await plain.get(stats_url)).json()
        finally:
            await client.aclose()
    return left, after["gone"] - before["gone"], failed


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        serve(args.serve, args.max_requests)
        return 0
    from tests.fakes.tls_upstream import certificates

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    ca_file, _, _ = certificates(WORK)
    command = [sys.executable, "-m", "bench.provider_http", "--serve", str(WORK)]
    command += ["--max-requests", str(args.max_requests)]
    print("==> starting the TLS upstream", file=sys.stderr)
    server = subprocess.Popen(command, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while not (WORK / "port").exists():
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the TLS upstream did not start")
            time.sleep(0.05)
        base_url = f"https://127.0.0.1:{int((WORK / 'port').read_text())}/v1"
        loops.run(run(base_url, ca_file, args), "uvloop")
    finally:
        server.terminate()
        server.wait(10)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
