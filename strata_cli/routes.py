"""`strata routes`: the routes of a routes file, validated as the orchestrator validates them.

    strata routes [--file config/routes.yaml] [--models config/models.yaml] [--json]
    strata routes --remote [--address A] [--key K] [--json]

By default it reads the file the orchestrator reads, offline: --file, else
$STRATA_ORCHESTRATOR_ROUTES_FILE, else config/routes.yaml, with the candidates checked
against --models, else $STRATA_ORCHESTRATOR_MODELS_FILE, else config/models.yaml; an
invalid file exits 2 with the orchestrator's own message. --remote asks the running
orchestrator instead (ListModels: name, policy and candidates of the routes it serves).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc

from services.common.catalog import load_catalog
from services.common.settings import ConfigError
from services.orchestrator.routes import RouteConfig, load_routes
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.client import (
    ROOT,
    Metadata,
    add_orchestrator_arguments,
    call_orchestrator,
    print_json,
    usage_error,
)


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `strata routes`."""
    routes = commands.add_parser("routes", help="list the routes of the routes file (offline)")
    routes.add_argument(
        "--file",
        type=Path,
        default=Path(
            os.environ.get("STRATA_ORCHESTRATOR_ROUTES_FILE", ROOT / "config" / "routes.yaml")
        ),
        help="routes file (default: $STRATA_ORCHESTRATOR_ROUTES_FILE or config/routes.yaml)",
    )
    routes.add_argument(
        "--models",
        type=Path,
        default=Path(
            os.environ.get("STRATA_ORCHESTRATOR_MODELS_FILE", ROOT / "config" / "models.yaml")
        ),
        help="models file (default: $STRATA_ORCHESTRATOR_MODELS_FILE or config/models.yaml)",
    )
    routes.add_argument(
        "--remote",
        action="store_true",
        help="ask the running orchestrator (ListModels) instead of reading the file",
    )
    add_orchestrator_arguments(routes)
    routes.set_defaults(run=run_routes)


def route_summary(route: RouteConfig) -> dict[str, Any]:
    """The route as JSON-ready data, unset fields left out."""
    data: dict[str, Any] = route.model_dump(mode="json", exclude_none=True)
    return data


def format_routes(routes: Mapping[str, RouteConfig]) -> str:
    """A line a route (name, policy, candidates), then its limits and rules indented."""
    if not routes:
        return "(no routes)"
    width = max(len(name) for name in routes) + 2
    lines = []
    for name, route in routes.items():
        candidates = ", ".join(
            f"{c} ({route.weights[c]:g})" if route.weights else c for c in route.candidates
        )
        lines.append(f"{name:<{width}}{route.policy:<10}{candidates}")
        details = []
        if route.latency_budget_s is not None:
            details.append(f"deadline {route.latency_budget_s:g} s")
        if route.max_cost_usd is not None:
            details.append(f"max ${route.max_cost_usd}")
        if route.cache is not None:
            details.append("semantic cache" if route.cache.semantic else "exact cache")
        if route.guardrail_profile:
            details.append(f"guardrails {route.guardrail_profile}")
        if route.retrieval is not None:
            details.append(f"retrieval {route.retrieval.collection}")
        if details:
            lines.append(" " * width + " · ".join(details))
        for rule in route.rules or ():
            when = ", ".join(filter(None, (_condition(k, v) for k, v in rule.when)))
            lines.append(" " * width + f"when {when}: {', '.join(rule.candidates)}")
    return "\n".join(lines)


def _condition(key: str, value: Any) -> str:
    """`tiers free|pro`, `tags kind=draft`, `prompt_tokens_over 2000`; '' when unset."""
    if value is None or value == [] or value == {}:
        return ""
    if isinstance(value, dict):
        return f"{key} " + " ".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list):
        return f"{key} " + "|".join(str(v) for v in value)
    return f"{key} {value}"


def _remote(args: argparse.Namespace) -> int:
    def body(channel: grpc.Channel, metadata: Metadata) -> int:
        reply = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).ListModels(
            orchestrator_pb2.ListModelsRequest(), metadata=metadata, timeout=10
        )
        if args.json:
            print_json(
                {
                    "address": args.address,
                    "routes": [
                        {"name": r.name, "policy": r.policy, "candidates": list(r.candidates)}
                        for r in reply.routes
                    ],
                }
            )
        elif not reply.routes:
            print("(no routes)")
        else:
            width = max(len(r.name) for r in reply.routes) + 2
            for r in reply.routes:
                print(f"{r.name:<{width}}{r.policy:<10}{', '.join(r.candidates)}")
        return 0

    return call_orchestrator(args, body)


def run_routes(args: argparse.Namespace) -> int:
    """`strata routes`: 0 with the routes, 2 when a file is missing or invalid (or, with
    --remote, without a key), 1 on a gRPC error."""
    if args.remote:
        return _remote(args)
    try:
        routes = load_routes(args.file, load_catalog(args.models))
    except ConfigError as err:
        return usage_error(str(err))
    if args.json:
        print_json(
            {
                "file": str(args.file),
                "routes": [route_summary(route) for route in routes.values()],
            }
        )
    else:
        print(format_routes(routes))
    return 0
