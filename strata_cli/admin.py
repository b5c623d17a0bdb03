"""`strata admin`: the control service's admin API from the command line.

    strata admin keys create --tenant acme [--id web] [--team search]
    strata admin keys list --tenant acme
    strata admin keys revoke --tenant acme --id web
    strata admin budget --tenant acme [--team T | --key K] --period month --usd 250
    strata admin limits --tenant acme [--key K] --rpm 600 --tpm 200000 [--concurrency 32]
    strata admin limits --model gpt-4o --rpm 5000
    strata admin usage --tenant acme [--team T | --key K | --model M] --period day
    strata admin breakers

The common ones at the top level too, their options after the verb:

    strata keys list --tenant acme | strata keys revoke --tenant acme --id web
    strata keys create --tenant acme --register [--team T]
    strata budgets set --tenant acme --period month --usd 250
    strata budgets show --tenant acme [--period month]
    strata usage --tenant acme [--period day] [--json]

The admin token comes from --token or $STRATA_ADMIN_TOKEN (none: exit 2), the address from
--address or $STRATA_CONTROL_ADDRESS (default 127.0.0.1:50052). Mutations send a fresh
request id (or --request-id), so a retried command is applied once. --json prints the raw
answer.
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from decimal import Decimal
from typing import Any

import grpc
from google.protobuf import json_format

from strata.control.v1 import admin_pb2, admin_pb2_grpc
from strata_cli.errors import describe_error

PERIODS = {
    "day": admin_pb2.PERIOD_DAY,
    "month": admin_pb2.PERIOD_MONTH,
    "total": admin_pb2.PERIOD_TOTAL,
}


def add_parser(commands: Any) -> None:
    """Adds `admin` and its subcommands to the `strata` command line."""
    admin = commands.add_parser("admin", help="keys, budgets, limits, usage, breakers")
    add_connection_arguments(admin)
    verbs = admin.add_subparsers(dest="verb", required=True)

    keys = verbs.add_parser("keys", help="API keys").add_subparsers(dest="keys", required=True)
    create = keys.add_parser("create", help="create a key (printed once)")
    create.add_argument("--tenant", required=True)
    create.add_argument("--id", default="")
    create.add_argument("--team", default="")
    create.set_defaults(call=create_key)
    listing = keys.add_parser("list", help="list a tenant's keys")
    listing.add_argument("--tenant", required=True)
    listing.set_defaults(call=_list)
    revoke = keys.add_parser("revoke", help="revoke a key")
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("--id", required=True)
    revoke.set_defaults(call=_revoke)

    budget = verbs.add_parser("budget", help="set a budget (0 removes it)")
    _scope_arguments(budget, model=False)
    budget.add_argument("--period", choices=sorted(PERIODS), required=True)
    budget.add_argument("--usd", type=Decimal, required=True)
    budget.set_defaults(call=_budget)

    limits = verbs.add_parser("limits", help="set rate and concurrency limits (0 removes)")
    _scope_arguments(limits, model=True)
    limits.add_argument("--rpm", type=int, default=0)
    limits.add_argument("--tpm", type=int, default=0)
    limits.add_argument("--concurrency", type=int, default=0)
    limits.set_defaults(call=_limits)

    usage = verbs.add_parser("usage", help="usage and spend for a period")
    _scope_arguments(usage, model=True)
    usage.add_argument("--period", choices=sorted(PERIODS), default="month")
    usage.set_defaults(call=_usage)

    breakers = verbs.add_parser("breakers", help="the models' circuit breakers")
    breakers.set_defaults(call=_breakers)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """--address, --token, --json and --request-id of the admin API."""
    parser.add_argument(
        "--address",
        default=os.environ.get("STRATA_CONTROL_ADDRESS", "127.0.0.1:50052"),
        help="the control service (default: $STRATA_CONTROL_ADDRESS or 127.0.0.1:50052)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("STRATA_ADMIN_TOKEN", ""),
        help="admin token (default: $STRATA_ADMIN_TOKEN)",
    )
    parser.add_argument("--json", action="store_true", help="print the raw answer as JSON")
    parser.add_argument("--request-id", default="", help="idempotency id of a mutation")


def add_aliases(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    keys: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """`strata budgets set|show`, `strata usage` and `strata keys list|revoke`: the admin
    commands under the names of the issue, their options after the verb."""
    budgets = commands.add_parser("budgets", help="set and show budgets (admin API)")
    budget_verbs = budgets.add_subparsers(dest="verb", required=True)
    budget_set = budget_verbs.add_parser("set", help="set a budget (0 removes it)")
    _scope_arguments(budget_set, model=False)
    budget_set.add_argument("--period", choices=sorted(PERIODS), required=True)
    budget_set.add_argument("--usd", type=Decimal, required=True)
    budget_set.set_defaults(call=_budget)
    budget_show = budget_verbs.add_parser("show", help="a budget and what it has left")
    _scope_arguments(budget_show, model=False)
    budget_show.add_argument("--period", choices=sorted(PERIODS), default="month")
    budget_show.set_defaults(call=_budget_show)

    usage = commands.add_parser("usage", help="usage and spend for a period (admin API)")
    _scope_arguments(usage, model=True)
    usage.add_argument("--period", choices=sorted(PERIODS), default="month")
    usage.set_defaults(call=_usage)

    listing = keys.add_parser("list", help="list a tenant's keys (admin API)")
    listing.add_argument("--tenant", required=True)
    listing.set_defaults(call=_list)
    revoke = keys.add_parser("revoke", help="revoke a key (admin API)")
    revoke.add_argument("--tenant", required=True)
    revoke.add_argument("--id", required=True)
    revoke.set_defaults(call=_revoke)

    for leaf in (budget_set, budget_show, usage, listing, revoke):
        add_connection_arguments(leaf)
        leaf.set_defaults(run=run)


def _scope_arguments(parser: argparse.ArgumentParser, *, model: bool) -> None:
    parser.add_argument("--tenant", default="")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--team")
    which.add_argument("--key")
    if model:
        which.add_argument("--model")


def _scope(args: argparse.Namespace) -> tuple[Any, str]:
    if getattr(args, "model", None):
        return admin_pb2.SCOPE_MODEL, args.model
    if args.team:
        return admin_pb2.SCOPE_TEAM, args.team
    if args.key:
        return admin_pb2.SCOPE_KEY, args.key
    return admin_pb2.SCOPE_TENANT, ""


def _request_id(args: argparse.Namespace) -> str:
    return str(args.request_id or uuid.uuid4().hex)


def create_key(stub: Any, args: argparse.Namespace, metadata: Any) -> tuple[Any, str]:
    """CreateApiKey: the answer, and the key (shown once) for people."""
    reply = stub.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            request_id=_request_id(args), tenant_id=args.tenant, key_id=args.id, team_id=args.team
        ),
        metadata=metadata,
        timeout=10,
    )
    return reply, f"{reply.api_key}\n(key {reply.key.tenant_id}/{reply.key.key_id}; shown once)"


def _list(stub: Any, args: argparse.Namespace, metadata: Any) -> tuple[Any, str]:
    keys, token = [], ""
    while True:
        page = stub.ListApiKeys(
            admin_pb2.ListApiKeysRequest(tenant_id=args.tenant, page_token=token),
            metadata=metadata,
            timeout=10,
        )
        keys.extend(page.keys)
        token = page.next_page_token
        if not token:
            break
    lines = [
        f"{k.key_id:<24} {admin_pb2.ApiKeyState.Name(k.state).removeprefix('API_KEY_STATE_'):<8}"
        f" team={k.team_id or '-'} {k.prefix}"
        for k in keys
    ]
    return admin_pb2.ListApiKeysResponse(keys=keys), "\n".join(lines) or "(no keys)"


def _revoke(stub: Any, args: argparse.Namespace, metadata: Any) -> tuple[Any, str]:
    reply = stub.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(
            request_id=_request_id(args), tenant_id=args.tenant, key_id=args.id
        ),
        metadata=metadata,
        timeout=10,
    )
    return reply, f"revoked {reply.key.tenant_id}/{reply.key.key_id}"


def _budget(stub: Any, args: argparse.Namespace, metadata: Any) -> tuple[Any, str]:
    scope, scope_id = _scope(args)
    reply = stub.SetBudget(
        admin_pb2.SetBudgetRequest(
            request_id=_request_id(args),
            tenant_id=args.tenant,
            scope=scope,
            scope_id=scope_id,
            period=PERIODS[args.period],
            limit_usd_micros=int(args.usd * 1_000_000),
        ),
        metadata=metadata,
        timeout=10,
    )
    return reply, f"{args.period} budget: ${reply.limit_usd_micros / 1e6:,.6f}"


def _budget_show(stub: Any, args: argparse.Namespace, metadata: Any) -> tuple[Any, str]:
    reply, _ = _usage(stub, args, metadata)
    if not reply.budget_usd_micros:
        return reply, (
            f"no {args.period} budget; spent ${reply.spent_usd_micros / 1e6:,.6f}, "
            f"reserved ${reply.reserved_usd_micros / 1e6:,.6f}"
        )
    left = reply.budget_usd_micros - reply.spent_usd_micros - reply.reserved_usd_micros
    return reply, (
        f"{args.period} budget ${reply.budget_usd_micros / 1e6:,.2f}: spent "
        f"${reply.spent_usd_micros / 1e6:,.6f}, reserved ${reply.reserved_usd_micros / 1e6:,.6f}"
        f", left ${max(left, 0) / 1e6:,.6f}"
    )


def _limits(stub: Any, args: argparse.Namespace, metadata: Any) -> tuple[Any, str]:
    scope, scope_id = _scope(args)
    reply = stub.SetLimits(
        admin_pb2.SetLimitsRequest(
            request_id=_request_id(args),
            tenant_id=args.tenant,
            scope=scope,
            scope_id=scope_id,
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
            max_concurrent=args.concurrency,
        ),
        metadata=metadata,
        timeout=10,
    )
    return reply, (
        f"requests/min {reply.requests_per_minute or '-'}, tokens/min "
        f"{reply.tokens_per_minute or '-'}, concurrent {reply.max_concurrent or '-'}"
    )


def _usage(stub: Any, args: argparse.Namespace, metadata: Any) -> tuple[Any, str]:
    scope, scope_id = _scope(args)
    reply = stub.GetUsage(
        admin_pb2.GetUsageRequest(
            tenant_id=args.tenant, scope=scope, scope_id=scope_id, period=PERIODS[args.period]
        ),
        metadata=metadata,
        timeout=10,
    )
    budget = f" of ${reply.budget_usd_micros / 1e6:,.2f}" if reply.budget_usd_micros else ""
    return reply, (
        f"{args.period}: {reply.requests} requests, {reply.usage.input_tokens} in / "
        f"{reply.usage.output_tokens} out tokens, spent ${reply.spent_usd_micros / 1e6:,.6f}"
        f"{budget}, reserved ${reply.reserved_usd_micros / 1e6:,.6f}, "
        f"{reply.cache_hits} cache hits"
    )


def _breakers(stub: Any, args: argparse.Namespace, metadata: Any) -> tuple[Any, str]:
    breakers, token = [], ""
    while True:
        page = stub.ListBreakers(
            admin_pb2.ListBreakersRequest(page_token=token), metadata=metadata, timeout=10
        )
        breakers.extend(page.breakers)
        token = page.next_page_token
        if not token:
            break
    lines = [
        f"{b.model:<28} {admin_pb2.BreakerState.Name(b.state).removeprefix('BREAKER_STATE_'):<10}"
        f" failures in a row: {b.consecutive_failures}"
        for b in breakers
    ]
    return admin_pb2.ListBreakersResponse(breakers=breakers), "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs one admin command: 1 with the gRPC code and reason on failure, 2 without a
    token."""
    if not args.token:
        print("error: no admin token: pass --token or set STRATA_ADMIN_TOKEN", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {args.token}"),)
    with grpc.insecure_channel(args.address) as channel:
        stub = admin_pb2_grpc.ControlAdminServiceStub(channel)
        try:
            reply, text = args.call(stub, args, metadata)
        except grpc.RpcError as err:
            print(f"error: {describe_error(err)}", file=sys.stderr)
            return 1
    if args.json:
        print(json_format.MessageToJson(reply, preserving_proto_field_name=True))
    else:
        print(text)
    return 0
