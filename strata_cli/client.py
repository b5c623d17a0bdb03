"""What the commands that call the orchestrator with an API key share: their arguments,
the key, the exit codes (0 ok, 1 a gRPC error, 2 usage or missing credentials) and JSON."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from strata_cli.errors import describe_error

DEFAULT_ADDRESS = "127.0.0.1:50051"
ROOT = Path(__file__).resolve().parents[1]
"""The checkout, where config/ lives."""

Metadata = tuple[tuple[str, str], ...]


def add_orchestrator_arguments(parser: argparse.ArgumentParser) -> None:
    """--address, --key and --json."""
    parser.add_argument(
        "--address",
        default=os.environ.get("STRATA_ADDRESS", DEFAULT_ADDRESS),
        help=f"the orchestrator (default: $STRATA_ADDRESS or {DEFAULT_ADDRESS})",
    )
    parser.add_argument("--key", help="API key (default: $STRATA_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")


def api_key(args: argparse.Namespace) -> str:
    """--key, else $STRATA_API_KEY, else ''."""
    return str(getattr(args, "key", None) or os.environ.get("STRATA_API_KEY", ""))


def message_dict(message: Message) -> dict[str, Any]:
    """A message as JSON-ready data, with the proto field names."""
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def print_json(document: Message | dict[str, Any] | list[Any]) -> None:
    """One JSON document on stdout."""
    data = message_dict(document) if isinstance(document, Message) else document
    print(json.dumps(data, indent=2, ensure_ascii=False))


def usage_error(text: str) -> int:
    """Prints `error: text` and returns the usage exit code, 2."""
    print(f"error: {text}", file=sys.stderr)
    return 2


def call_orchestrator(
    args: argparse.Namespace, body: Callable[[grpc.Channel, Metadata], int]
) -> int:
    """Runs `body` on a channel to the orchestrator with the key's metadata: 2 without a
    key, 1 with the code and reason of a gRPC error, else what `body` returns."""
    key = api_key(args)
    if not key:
        return usage_error("no API key: pass --key or set STRATA_API_KEY")
    metadata: Metadata = (("authorization", f"Bearer {key}"),)
    try:
        with grpc.insecure_channel(args.address) as channel:
            return body(channel, metadata)
    except grpc.RpcError as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 1
