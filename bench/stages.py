"""Where a request's time goes, by the orchestrator's own clock: the stage timings of the
request records (GetTrace) of back-to-back Generate calls.

    .venv/bin/python -m bench.stages [--scenario exact-hit] [--requests 400] [--pause-ms 0]

Starts the local upstream and Strata's four services (each its own process, as in
`make bench`), sends `--requests` Generate calls one at a time over gRPC (an exact hit: the
same question each time; an exact miss: a new one each time), reads back the records of
those after the warm-up, and prints the client's median latency beside the median of each
stage the orchestrator timed (prepare, admission, cache lookup, model, cache hit replay,
settlement after the reply). `--pause-ms` leaves that much idle between calls: the gap
between the two runs is what waking the processes costs.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Sequence

import grpc

from bench.gateway_overhead import WORK, request_fields, strata_on_upstream
from strata.orchestrator.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    traces_pb2,
    traces_pb2_grpc,
)

SCENARIOS = ("exact-hit", "unary-exact-miss")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenario", choices=SCENARIOS, default="exact-hit")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--pause-ms", type=float, default=0.0)
    parser.add_argument("--chunks", type=int, default=20)
    args = parser.parse_args(argv)
    if not 0 <= args.warmup < args.requests:
        parser.error("--warmup must be below --requests")
    # What strata_on_upstream's upstream takes.
    args.chunk_delay_ms = args.first_delay_ms = 0.0
    return args


async def measure(address: str, key: str, args: argparse.Namespace) -> None:
    metadata = (("authorization", f"Bearer {key}"),)
    async with grpc.aio.insecure_channel(address) as channel:
        generate = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).Generate
        get_trace = traces_pb2_grpc.TraceServiceStub(channel).GetTrace
        latencies: list[float] = []
        request_ids: list[str] = []
        for n in range(args.requests):
            question = (
                "What is the capital of France?"
                if args.scenario == "exact-hit"
                else f"Question {uuid.uuid4().hex}?"
            )
            request = orchestrator_pb2.GenerateRequest(**request_fields(question, True))
            began = time.perf_counter()
            answer = await generate(request, metadata=metadata, timeout=30)
            if n >= args.warmup:
                latencies.append(time.perf_counter() - began)
                request_ids.append(answer.request_id)
            if args.pause_ms:
                await asyncio.sleep(args.pause_ms / 1000)
        await asyncio.sleep(1.0)  # records are saved after the reply
        stages: dict[str, list[float]] = collections.defaultdict(list)
        for request_id in request_ids:
            record = (
                await get_trace(
                    traces_pb2.GetTraceRequest(request_id=request_id),
                    metadata=metadata,
                    timeout=10,
                )
            ).record
            for stage in record.stages:
                stages[stage.stage].append(stage.duration.ToMicroseconds() / 1000)
    print(
        f"{args.scenario}, {len(latencies)} requests after {args.warmup} of warm-up, "
        f"{args.pause_ms:g} ms between calls"
    )
    print(f"  client latency p50 {statistics.median(latencies) * 1000:7.2f} ms")
    for name, durations in stages.items():
        print(
            f"  {name:<20} p50 {statistics.median(durations):7.3f} ms  ({len(durations)} records)"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    run_dir = WORK / "stages"
    shutil.rmtree(run_dir, ignore_errors=True)  # (a stale port file would be read)
    tenant = f"stages-{started:%Y%m%dt%H%M%S}"
    with strata_on_upstream(run_dir, args, tenant) as (local, key):
        print(f"==> {args.requests} x {args.scenario}, one at a time", file=sys.stderr)
        asyncio.run(measure(local.addresses["orchestrator"], key, args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
