"""What a Redis command costs the caller through the services' pool and through redis-py's.

    .venv/bin/python -m bench.redis_pool [--commands 3000] [--rounds 7]

The services' client (services.common.redis_state.connect) takes an idle connection and
gives it back without redis-py's condition, timer and hooks while no command waits for
one, and bounds each write with asyncio.timeout rather than asyncio.wait_for (which makes
a task per command). This sends `--commands` GETs one after another, then as many
two-command pipelines, through that client and through redis-py's own
BlockingConnectionPool and connection class with the same settings, on uvloop as the
services run, the two taking turns in each round.
Prints the median over rounds of the caller's CPU microseconds per command (or pipeline),
from time.process_time. Redis: $STRATA_BENCH_REDIS_URL, else db 14 of the local one, else
a private redis-server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import redis.asyncio as redis

from bench.harness import bench_redis
from services.common import loops
from services.common.redis_state import connect

KINDS = ("redis-py pool", "services' pool")


def _client(url: str, kind: str) -> redis.Redis:
    client = connect(url, timeout_s=1.0)
    if kind == "services' pool":
        return client
    pool = client.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool)
    stock = next(c for c in pool.connection_class.__mro__ if c.__module__.startswith("redis."))
    plain = redis.BlockingConnectionPool(
        connection_class=stock,
        max_connections=pool.max_connections,
        timeout=pool.timeout,
        **pool.connection_kwargs,
    )
    return redis.Redis.from_pool(plain)


async def _measure(url: str, kind: str, commands: int) -> tuple[float, float]:
    client = _client(url, kind)
    try:
        await client.ping()
        began = time.process_time()
        for _ in range(commands):
            await client.get("strata:bench:pool")
        one = (time.process_time() - began) / commands
        began = time.process_time()
        for _ in range(commands):
            async with client.pipeline(transaction=False) as pipe:
                pipe.get("strata:bench:pool")
                pipe.get("strata:bench:pool:other")
                await pipe.execute()
        two = (time.process_time() - began) / commands
    finally:
        await client.aclose()
    return one * 1e6, two * 1e6


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--commands", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    results: dict[str, list[tuple[float, float]]] = {kind: [] for kind in KINDS}
    with bench_redis() as url:
        for number in range(args.rounds):
            print(f"==> round {number + 1}/{args.rounds}", file=sys.stderr)
            order = KINDS if number % 2 == 0 else KINDS[::-1]
            for kind in order:
                results[kind].append(loops.run(_measure(url, kind, args.commands), "uvloop"))
    print("\n| pool | CPU µs per GET | CPU µs per 2-command pipeline |")
    print("|---|---:|---:|")
    for kind in KINDS:
        one = statistics.median(r[0] for r in results[kind])
        two = statistics.median(r[1] for r in results[kind])
        print(f"| {kind} | {one:.0f} | {two:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
