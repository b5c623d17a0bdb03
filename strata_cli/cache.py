"""`strata cache`: tune the semantic threshold, read statistics, invalidate entries.

    strata cache tune FILE [--target 0.02]          pick the threshold for a wrong-answer rate
    strata cache stats --tenant acme
    strata cache invalidate --tenant acme (--model M | --document D | --older-than 3600 | --all)

`tune` runs the labelled pairs of FILE (JSON lines: a, b, same_answer[, category]) through
the running cache service (in scopes of their own) and prints the lowest threshold whose
wrong-answer rate stays at or under the target, with the hit rate it keeps. The admin
calls use --token or $STRATA_CACHE_ADMIN_TOKEN; the address is --address or
$STRATA_CACHE_ADDRESS (default 127.0.0.1:50053).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from strata.cache.v1 import cache_pb2, cache_pb2_grpc
from strata_cli.cache_eval import best_threshold, load_pairs, report, run_pairs
from strata_cli.errors import describe_error


def add_parser(commands: Any) -> None:
    """Adds `cache` and its subcommands to the `strata` command line."""
    cache = commands.add_parser("cache", help="tune, stats, invalidate")
    cache.add_argument(
        "--address", default=os.environ.get("STRATA_CACHE_ADDRESS", "127.0.0.1:50053")
    )
    cache.add_argument("--token", default=os.environ.get("STRATA_CACHE_ADMIN_TOKEN", ""))
    cache.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    verbs = cache.add_subparsers(dest="verb", required=True)

    tune = verbs.add_parser("tune", help="pick the similarity threshold from labelled pairs")
    tune.add_argument("file", type=Path)
    tune.add_argument("--target", type=float, default=0.02, help="wrong-answer rate (0.02 = 2%%)")
    tune.add_argument("--lenient", action="store_true", help="ambiguous pairs are not traps")
    tune.set_defaults(call=_tune)

    stats = verbs.add_parser("stats", help="a tenant's cache statistics")
    stats.add_argument("--tenant", required=True)
    stats.set_defaults(call=_stats)

    invalidate = verbs.add_parser("invalidate", help="drop entries")
    invalidate.add_argument("--tenant", required=True)
    invalidate.add_argument("--model", default="")
    invalidate.add_argument("--document", default="")
    invalidate.add_argument("--older-than", type=float, help="seconds")
    invalidate.add_argument("--all", action="store_true")
    invalidate.set_defaults(call=_invalidate)


def _tune(channel: grpc.Channel, args: argparse.Namespace, metadata: Any) -> int:
    pairs = load_pairs(args.file, strict=not args.lenient)
    outcomes = run_pairs(cache_pb2_grpc.CacheServiceStub(channel), pairs)
    best = best_threshold(outcomes, args.target)
    print(report(args.file.name, outcomes, best.threshold))
    print(
        f"\nthreshold {best.threshold:.4f}: hit rate {best.hit_rate:.1%} at a wrong-answer rate "
        f"of {best.wrong_rate:.1%} (target {args.target:.1%}); set it with "
        f"STRATA_CACHE_MIN_SIMILARITY={best.threshold:.4f} or per route"
    )
    return 0


def _stats(channel: grpc.Channel, args: argparse.Namespace, metadata: Any) -> int:
    stub = cache_pb2_grpc.CacheAdminServiceStub(channel)
    reply = stub.GetStats(
        cache_pb2.GetStatsRequest(tenant_id=args.tenant), metadata=metadata, timeout=10
    )
    if args.json:
        print(json_format.MessageToJson(reply, preserving_proto_field_name=True))
        return 0
    lookups = reply.exact_hits + reply.semantic_hits + reply.misses
    hit_rate = (reply.exact_hits + reply.semantic_hits) / lookups if lookups else 0.0
    print(
        f"{args.tenant}: {lookups} lookups, hit rate {hit_rate:.1%} (exact {reply.exact_hits}, "
        f"semantic {reply.semantic_hits}), {reply.stores} stores, {reply.entries} entries"
    )
    if reply.guard_rejections:
        refused = ", ".join(f"{k} {v}" for k, v in sorted(reply.guard_rejections.items()))
        print(f"close candidates refused by guard: {refused}")
    if reply.audits:
        print(f"audited hits: {reply.audits}, disagreements {reply.audit_disagreements}")
    return 0


def _invalidate(channel: grpc.Channel, args: argparse.Namespace, metadata: Any) -> int:
    request = cache_pb2.InvalidateRequest(
        request_id=uuid.uuid4().hex,
        tenant_id=args.tenant,
        model=args.model,
        document_id=args.document,
        all=args.all,
    )
    if args.older_than is not None:
        request.older_than.FromSeconds(int(time.time() - args.older_than))
    stub = cache_pb2_grpc.CacheAdminServiceStub(channel)
    reply = stub.Invalidate(request, metadata=metadata, timeout=30)
    print(json_format.MessageToJson(reply) if args.json else f"removed {reply.removed} entries")
    return 0


def run(args: argparse.Namespace) -> int:
    """Runs one cache command; non-zero with the gRPC code and reason on failure."""

    metadata = (("authorization", f"Bearer {args.token}"),)
    with grpc.insecure_channel(args.address) as channel:
        try:
            return int(args.call(channel, args, metadata))
        except grpc.RpcError as err:
            print(f"error: {describe_error(err)}", file=sys.stderr)
            return 1
