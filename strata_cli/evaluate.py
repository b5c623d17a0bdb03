"""`strata eval ROUTE FILE`: a labelled set through each of a route's candidate models.

Every case of the JSON-lines FILE (see services/orchestrator/graders.py) goes to every
candidate of ROUTE (its own list and its rules'), through the running orchestrator with the
cache bypassed, so each answer is the model's own. The report gives, per candidate and over
all: cases, errors, mean quality score, latency p50/p95 and cost. The route's other settings
(retrieval, guardrail profile) are not applied: the point is to compare the models.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import grpc

from services.common.catalog import load_catalog
from services.common.settings import ConfigError
from services.orchestrator.graders import (
    CaseFileError,
    CaseResult,
    EvalCase,
    format_summary,
    load_cases,
    summarize,
)
from services.orchestrator.routes import RouteConfig, load_routes
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.errors import describe_error

Stub = orchestrator_pb2_grpc.OrchestratorServiceStub
_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `strata eval`."""
    evaluate = commands.add_parser(
        "eval", help="score a route's candidate models on a labelled set (JSON lines)"
    )
    evaluate.add_argument("route", help="a route of the routes file")
    evaluate.add_argument("file", help="JSON-lines cases: id, prompt or messages, grade")
    evaluate.add_argument("--address", default=os.environ.get("STRATA_ADDRESS", "127.0.0.1:50051"))
    evaluate.add_argument("--key", help="API key (default: $STRATA_API_KEY)")
    evaluate.add_argument(
        "--routes",
        default=os.environ.get("STRATA_ORCHESTRATOR_ROUTES_FILE", "config/routes.yaml"),
        help="the routes file (default: $STRATA_ORCHESTRATOR_ROUTES_FILE or config/routes.yaml)",
    )
    evaluate.add_argument(
        "--models",
        default=os.environ.get("STRATA_ORCHESTRATOR_MODELS_FILE", "config/models.yaml"),
        help="the models file the routes refer to",
    )
    evaluate.add_argument("--concurrency", type=int, default=4, help="calls at once")
    evaluate.add_argument("--timeout", type=float, default=120.0, help="seconds per call")
    evaluate.add_argument("--json", action="store_true", help="print the summary as JSON")
    evaluate.set_defaults(run=run)


def candidates_of(route: RouteConfig) -> list[str]:
    """The route's candidates, then those only its rules name, each once."""
    names = list(route.candidates)
    for rule in route.rules or ():
        names += [c for c in rule.candidates if c not in names]
    return names


def _request(case: EvalCase, model: str) -> orchestrator_pb2.GenerateRequest:
    if case.prompt is not None:
        messages = [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=case.prompt)]
    else:
        messages = [
            common_pb2.ChatMessage(role=_ROLES[m["role"]], content=m["content"])
            for m in case.messages or ()
        ]
    return orchestrator_pb2.GenerateRequest(
        model=model,
        messages=messages,
        tags=case.tags,
        cache_policy=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_BYPASS),
    )


async def evaluate(
    address: str,
    api_key: str,
    models: list[str],
    cases: list[EvalCase],
    concurrency: int = 4,
    timeout_s: float = 120.0,
) -> list[CaseResult]:
    """Runs every case on every model; progress goes to stderr."""

    metadata = (("authorization", f"Bearer {api_key}"),)
    limit = asyncio.Semaphore(max(1, concurrency))
    total = len(models) * len(cases)
    done = 0

    async def one(
        stub: orchestrator_pb2_grpc.OrchestratorServiceStub, case: EvalCase, model: str
    ) -> CaseResult:
        nonlocal done
        async with limit:
            started = time.perf_counter()
            try:
                reply = await stub.Generate(
                    _request(case, model), metadata=metadata, timeout=timeout_s
                )
                result = CaseResult(
                    case.id,
                    model,
                    case.score(reply.text),
                    time.perf_counter() - started,
                    reply.cost.total_usd_micros,
                )
            except grpc.aio.AioRpcError as err:
                result = CaseResult(
                    case.id, model, 0.0, time.perf_counter() - started, 0, describe_error(err)
                )
        done += 1
        mark = "error " + (result.error or "") if result.error else f"score {result.score:.2f}"
        print(f"[{done}/{total}] {model} {case.id}: {mark}", file=sys.stderr)
        return result

    async with grpc.aio.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        return list(
            await asyncio.gather(*(one(stub, case, model) for model in models for case in cases))
        )


def run(args: argparse.Namespace) -> int:
    """`strata eval`: exit 0 with the report, 2 on bad input, 1 when every call failed."""
    key = args.key or os.environ.get("STRATA_API_KEY", "")
    if not key:
        print("error: no API key: pass --key or set STRATA_API_KEY", file=sys.stderr)
        return 2
    try:
        routes = load_routes(Path(args.routes), load_catalog(Path(args.models)))
        cases = load_cases(Path(args.file))
    except (ConfigError, CaseFileError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    route = routes.get(args.route)
    if route is None:
        print(f"error: no route {args.route!r} in {args.routes}", file=sys.stderr)
        return 2
    models = candidates_of(route)
    print(
        f"==> {len(cases)} cases x {len(models)} candidates of route {args.route}: "
        + ", ".join(models),
        file=sys.stderr,
    )
    results = asyncio.run(
        evaluate(args.address, key, models, cases, args.concurrency, args.timeout)
    )
    summary = summarize(results)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 1 if all(r.error for r in results) else 0
