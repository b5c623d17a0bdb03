"""Lookup latency of the cache service: exact hit, semantic hit, miss (p50 and p95).

    .venv/bin/python -m bench.cache_latency [--rounds 200] [--entries 2000]

Starts a real CacheService (local embedder, embedded Qdrant engine, real Redis), fills one
tenant with `--entries` answers in many scopes, then times Lookup over gRPC from this
process. Medians of the rounds are reported; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from bench.harness import bench_redis, percentile, served
from services.cache.app import build
from services.cache.settings import CacheSettings
from strata.cache.v1 import cache_pb2, cache_pb2_grpc
from strata.common.v1 import common_pb2

TOPICS = ["password", "invoice", "parcel", "refund", "address", "plan", "card", "order"]


def scope(tenant: str, n: int) -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(
        tenant_id=tenant,
        model=f"bench-{n % 50}",
        params=common_pb2.GenerationParams(temperature=0),
    )


def ask(text: str) -> list[common_pb2.ChatMessage]:
    return [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--entries", type=int, default=2000)
    args = parser.parse_args()
    tenant = f"latency-{uuid.uuid4().hex[:8]}"
    with bench_redis() as redis_url, tempfile.TemporaryDirectory() as data_dir:
        settings = CacheSettings(
            redis_url=redis_url, data_dir=Path(data_dir), host="127.0.0.1", port=0
        )
        with served(settings, build) as address, grpc.insecure_channel(address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            answer = cache_pb2.CachedAnswer(text="ok", finish_reason=common_pb2.FINISH_REASON_STOP)
            print(f"==> storing {args.entries} entries", file=sys.stderr)
            for n in range(args.entries):
                topic = TOPICS[n % len(TOPICS)]
                stub.Store(
                    cache_pb2.StoreRequest(
                        scope=scope(tenant, n),
                        messages=ask(f"How do I change my {topic}, case {n}?"),
                        answer=answer,
                    )
                )
            cases = {
                "exact hit": lambda n: ask(f"How do I change my {TOPICS[n % 8]}, case {n}?"),
                "semantic hit": lambda n: ask(f"How can I change my {TOPICS[n % 8]}, case {n}?"),
                "miss": lambda n: ask(f"Unrelated question {uuid.uuid4().hex} about weather"),
            }
            for name, messages in cases.items():
                samples, kinds = [], set()
                for round_ in range(args.rounds):
                    n = (round_ * 7) % args.entries
                    started = time.perf_counter()
                    found = stub.Lookup(
                        cache_pb2.LookupRequest(scope=scope(tenant, n), messages=messages(n))
                    )
                    samples.append((time.perf_counter() - started) * 1000)
                    kinds.add(common_pb2.CacheMatch.Name(found.match))
                print(
                    f"{name:<13} p50 {statistics.median(samples):6.2f} ms   "
                    f"p95 {percentile(samples, 0.95):6.2f} ms   "
                    f"({args.rounds} lookups; {sorted(kinds)})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
