"""How often the semantic cache serves a wrong answer, on labelled pairs.

    .venv/bin/python -m bench.cache_quality [--pairs FILE] [--conversations FILE]

Starts a real CacheService (production build: local embedder, embedded Qdrant engine, real
Redis), stores each pair's `a`, looks up its `b` over gRPC, and prints hit and wrong-answer
rates overall and per category: at the service's default threshold, and the best hit rate
at <= 2% and <= 5% wrong answers. Pairs tagged `ambiguous` count as traps (strict mode).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.harness import bench_redis, served
from services.cache.app import build
from services.cache.settings import CacheSettings
from strata.cache.v1 import cache_pb2_grpc
from strata_cli.cache_eval import load_pairs, report, run_pairs

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cache-eval"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=Path, default=DATA / "pairs-dev.jsonl")
    parser.add_argument("--conversations", type=Path, default=DATA / "conversations-dev.jsonl")
    args = parser.parse_args()

    with bench_redis() as redis_url, tempfile.TemporaryDirectory() as data_dir:
        settings = CacheSettings(
            redis_url=redis_url, data_dir=Path(data_dir), host="127.0.0.1", port=0
        )
        print(f"==> starting the cache service (Redis {redis_url})", file=sys.stderr)
        with served(settings, build) as address, grpc.insecure_channel(address) as channel:
            stub = cache_pb2_grpc.CacheServiceStub(channel)
            for name, path in (("pairs", args.pairs), ("conversations", args.conversations)):
                if not path.exists():
                    print(f"(no {name} file at {path})", file=sys.stderr)
                    continue
                pairs = load_pairs(path)
                started = time.perf_counter()
                outcomes = run_pairs(stub, pairs)
                elapsed = time.perf_counter() - started
                print(report(f"{name} ({path.name})", outcomes, settings.min_similarity))
                print(f"  ({elapsed:.1f} s for {len(pairs)} store + lookup pairs)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
