"""`strata`: talk to a running Strata, make API keys, run the suite locally.

    strata chat "What is Strata?"          stream an answer (key from STRATA_API_KEY)
    strata keys create --tenant acme       print a new API key and the hash to configure
                                           (--register: create it through the admin API)
    strata keys list|revoke --tenant acme  a tenant's keys (admin API, STRATA_ADMIN_TOKEN)
    strata budgets set|show --tenant acme  budgets (admin API)
    strata usage --tenant acme             usage and spend for a period (admin API)
    strata admin ...                       keys, budgets, limits, usage, breakers (see --help)
    strata routes                          the routes of the routes file (offline)
    strata templates [show NAME@VERSION]   prompt templates and their variables (offline)
    strata documents ingest|list|delete|search COLLECTION ...    knowledge collections
    strata jobs submit|get|watch|cancel|list                     jobs
    strata cache ...                       tune the semantic threshold, stats, invalidate
    strata eval ROUTE FILE                 score a route's candidate models on labelled cases
    strata trace ID                        print what was recorded about one of your requests
    strata replay ID                       run a recorded request again (no cache) and diff
    strata dev                             run the four services locally (what `make run` does)
    strata health 127.0.0.1:50051          exit 0 when the service reports SERVING

The orchestrator's address is --address or $STRATA_ADDRESS, the API key --key or
$STRATA_API_KEY. Output is for people; --json prints one JSON document instead. Exit codes:
0 done, 1 a gRPC error (its code and Strata's reason on stderr), 2 a usage error or missing
credentials.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli import admin, cache, documents, evaluate, jobs, routes, templates, traces
from strata_cli.client import DEFAULT_ADDRESS
from strata_cli.errors import describe_error


def stream_chat(
    address: str,
    api_key: str,
    model: str,
    prompt: str,
    system: str | None = None,
    max_output_tokens: int | None = None,
    temperature: float | None = None,
) -> orchestrator_pb2.StreamGenerateResponse.Final:
    """Streams one answer to stdout; returns the final chunk."""
    write = sys.stdout.write
    asked = jobs.generate_request(prompt, model, None, system, max_output_tokens, temperature)
    request = orchestrator_pb2.StreamGenerateRequest(
        model=model, messages=asked.messages, params=asked.params
    )
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        started = time.perf_counter()
        first: float | None = None
        final = None
        for chunk in stub.StreamGenerate(
            request, metadata=(("authorization", f"Bearer {api_key}"),), timeout=120
        ):
            kind = chunk.WhichOneof("chunk")
            if kind == "delta":
                first = first or time.perf_counter()
                write(chunk.delta.text)
                sys.stdout.flush()
            elif kind == "start":
                start = chunk.start
                status = common_pb2.CacheStatus.Name(start.cache_status).removeprefix(
                    "CACHE_STATUS_"
                )
                print(f"[{start.request_id} · {start.model} · cache {status}]", file=sys.stderr)
            elif kind == "final":
                final = chunk.final
    if final is None:
        raise RuntimeError("the stream ended without a final chunk")
    elapsed = time.perf_counter() - started
    ttft = (first - started) if first else elapsed
    reason = (
        common_pb2.FinishReason.Name(final.finish_reason).removeprefix("FINISH_REASON_").lower()
    )
    print(
        f"\n[{reason} · {final.usage.input_tokens} in / {final.usage.output_tokens} out tokens"
        f" · ${final.cost.total_usd_micros / 1e6:.6f} · first token {ttft * 1000:.0f} ms"
        f" · total {elapsed * 1000:.0f} ms]",
        file=sys.stderr,
    )
    return final


def _chat(args: argparse.Namespace) -> int:
    key = args.key or os.environ.get("STRATA_API_KEY", "")
    if not key:
        print("error: no API key: pass --key or set STRATA_API_KEY", file=sys.stderr)
        return 2
    try:
        stream_chat(
            args.address,
            key,
            args.model,
            " ".join(args.prompt),
            args.system,
            args.max_output_tokens,
            args.temperature,
        )
    except grpc.RpcError as err:
        print(f"\nerror: {describe_error(err)}", file=sys.stderr)
        return 1
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    if args.register:
        return admin.run(args)
    from services.control.keys import new_key

    key, digest = new_key()
    key_id = args.id or f"{args.tenant}-{digest[:8]}"
    if args.json:
        print(
            json.dumps(
                {"tenant_id": args.tenant, "key_id": key_id, "api_key": key, "sha256": digest},
                indent=2,
            )
        )
        return 0
    print(f"API key (shown once, give it to the client): {key}")
    print(f"Add under tenants.{args.tenant}.keys in the tenants file:")
    print(f"  - id: {key_id}\n    sha256: {digest}")
    return 0


def _health(args: argparse.Namespace) -> int:
    try:
        with grpc.insecure_channel(args.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
    except grpc.RpcError as err:
        print(f"{args.address}: {describe_error(err)}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _dev(args: argparse.Namespace) -> int:
    from strata_cli.dev import run_dev

    return run_dev(Path(args.run_dir), Path(args.models), args.prompt)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    root = argparse.ArgumentParser(prog="strata", description=__doc__.splitlines()[0])
    commands = root.add_subparsers(dest="command", required=True)

    chat = commands.add_parser("chat", help="stream an answer from the orchestrator")
    chat.add_argument("prompt", nargs="+", help="the user message")
    chat.add_argument("--address", default=os.environ.get("STRATA_ADDRESS", DEFAULT_ADDRESS))
    chat.add_argument("--key", help="API key (default: $STRATA_API_KEY)")
    chat.add_argument("--model", default="mock-small", help="model alias (default: mock-small)")
    chat.add_argument("--system", help="a system message")
    chat.add_argument("--max-output-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.set_defaults(run=_chat)

    keys = commands.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="print a new key and the hash to configure")
    create.add_argument("--tenant", required=True)
    create.add_argument("--id", default="", help="key id (default: <tenant>-<hash prefix>)")
    create.add_argument(
        "--register",
        action="store_true",
        help="create the key in the control service through the admin API instead",
    )
    create.add_argument("--team", default="", help="the key's team (with --register)")
    admin.add_connection_arguments(create)
    create.set_defaults(run=_keys_create, call=admin.create_key)
    admin.add_aliases(commands, keys)

    health = commands.add_parser("health", help="check a service's gRPC health")
    health.add_argument("address")
    health.add_argument("--service", default="")
    health.add_argument("--timeout", type=float, default=2.0)
    health.set_defaults(run=_health)

    admin.add_parser(commands)
    cache.add_parser(commands)
    evaluate.add_parser(commands)
    traces.add_parser(commands)
    routes.add_parser(commands)
    templates.add_parser(commands)
    documents.add_parser(commands)
    jobs.add_parser(commands)

    dev = commands.add_parser("dev", help="run the four services locally on the mock provider")
    dev.add_argument("--run-dir", default=".run")
    dev.add_argument("--models", default="config/models.yaml")
    dev.add_argument("--prompt", default="What does Strata do for a platform team?")
    dev.set_defaults(run=_dev)
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "admin":
        return admin.run(args)
    if args.command == "cache":
        return cache.run(args)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
