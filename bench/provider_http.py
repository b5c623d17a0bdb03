"""What an upstream call over TLS costs the executor, over HTTP/1.1 and over HTTP/2.

    .venv/bin/python -m bench.provider_http [--calls 1600] [--rounds 3] [--concurrency 1,16]

A TLS upstream speaking OpenAI's chat completions (tests/fakes/tls_upstream.py: hypercorn,
a test certificate authority, ALPN offering h2 and http/1.1) runs as a process of its own,
retiring a connection after `--max-requests` requests as nginx and hypercorn do (1,000 by
default). In this process, on uvloop as the executor runs, the executor's OpenAI-compatible
provider makes `--calls` calls per configuration, `--concurrency` at a time: unary and
streamed (4 pieces, usage last), with `http2` off (HTTP/1.1 over the aiohttp transport, the
default) and on (httpx's HTTP/2 transport). Configurations take turns within each round.
Per configuration, medians over `--rounds` rounds: CPU microseconds of this process per
call, calls per second, and the calls that failed (summed over rounds, with their reasons).
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

from services.common import loops
from services.common.calls import Deadline
from services.common.catalog import ModelConfig, OpenAICompatibleProviderConfig
from services.common.errors import StrataError
from services.executor.providers.base import ProviderRequest
from services.executor.providers.openai_compatible import OpenAICompatibleProvider
from strata.common.v1 import common_pb2

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work" / "provider-http"
PROTOCOLS = {"http/1.1": False, "http/2": True}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1600, help="per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--max-requests", type=int, default=1000)
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


def request(n: int) -> ProviderRequest:
    return ProviderRequest(
        model=ModelConfig(name="tls-model", provider="tls", upstream_model="tls-model"),
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


async def measure(
    base_url: str, ca_file: Path, http2: bool, stream: bool, level: int, args: argparse.Namespace
) -> tuple[float, float, collections.Counter[str]]:
    """(CPU µs per call, calls per second, failures by reason) of one configuration."""
    config = OpenAICompatibleProviderConfig(
        kind="openai_compatible",
        base_url=base_url,
        ca_file=ca_file,
        http2=http2,
        max_connections=max(level, 1),
    )
    provider = OpenAICompatibleProvider("tls", config)
    failures: collections.Counter[str] = collections.Counter()

    async def worker(calls: int, offset: int) -> None:
        for n in range(calls):
            try:
                await one(provider, stream, offset + n)
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
        await provider.aclose()
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
