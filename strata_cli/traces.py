"""`strata trace ID` and `strata replay ID`: a request's record, and the request run again.

`trace` prints what the orchestrator recorded about one of the tenant's requests (the
prompt's route, template and hash, the cache decision, the retrieval sources, each model
attempt, usage, cost, where the time went and, when content capture is on, the output).

`replay` reads the record and sends its request again: a new request id, the same model or
route, messages and parameters (seed included), the cache neither read nor written. The
recorded messages are those the model saw (templates rendered, documents retrieved), so the
template and retrieval are not applied a second time. It prints the two side by side and a
diff of the output when the record captured it.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import sys
import time
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    traces_pb2,
    traces_pb2_grpc,
)
from strata_cli.errors import describe_error

TIMEOUT_S = 120.0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `strata trace` and `strata replay`."""
    for name, help_text, run in (
        ("trace", "print the record of one of your requests", run_trace),
        ("replay", "run a recorded request again (cache bypassed) and compare", run_replay),
    ):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("request_id", help="the request id (of Generate or a job)")
        command.add_argument(
            "--address", default=os.environ.get("STRATA_ADDRESS", "127.0.0.1:50051")
        )
        command.add_argument("--key", help="API key (default: $STRATA_API_KEY)")
        command.add_argument("--json", action="store_true", help="print JSON")
        command.set_defaults(run=run)


def get_trace(channel: grpc.Channel, api_key: str, request_id: str) -> traces_pb2.RequestRecord:
    """The tenant's record of the request."""
    reply = traces_pb2_grpc.TraceServiceStub(channel).GetTrace(
        traces_pb2.GetTraceRequest(request_id=request_id),
        metadata=(("authorization", f"Bearer {api_key}"),),
        timeout=10,
    )
    record: traces_pb2.RequestRecord = reply.record
    return record


def replay_request(record: traces_pb2.RequestRecord) -> orchestrator_pb2.GenerateRequest:
    """The recorded request, to run again: a fresh request id, the cache bypassed, and no
    template or retrieval (the recorded messages already hold what they produced)."""
    request = orchestrator_pb2.GenerateRequest()
    request.CopyFrom(record.request)
    request.request_id = ""
    request.ClearField("template")
    request.ClearField("retrieval")
    request.cache_policy.CopyFrom(common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_BYPASS))
    if not request.model and not request.route:
        request.model = record.model
    return request


def _ms(duration: duration_pb2.Duration) -> str:
    return f"{duration.ToNanoseconds() / 1e6:.0f} ms"


def _name(enum: Any, value: int, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix) if value else "-"


def _usage(usage: common_pb2.Usage) -> str:
    estimated = " (estimated)" if usage.estimated else ""
    return f"{usage.input_tokens} in / {usage.output_tokens} out tokens{estimated}"


def _usd(cost: common_pb2.Cost) -> str:
    return f"${cost.total_usd_micros / 1e6:.6f}"


def format_record(record: traces_pb2.RequestRecord) -> str:
    """The record, readably."""
    lines: list[str] = []

    def row(label: str, value: object) -> None:
        lines.append(f"{label:<10}{value}".rstrip())

    row("request", record.request_id)
    row("tenant", record.tenant_id)
    row("trace", record.trace_id or "-")
    if record.HasField("create_time"):
        row("time", record.create_time.ToJsonString())
    row("model", record.model or "-")
    prompt = record.prompt
    row(
        "prompt",
        f"route {prompt.route or '-'} · template {prompt.template or '-'}"
        f" · sha256 {prompt.prompt_hash or '-'}",
    )
    cache = _name(common_pb2.CacheStatus, record.cache_status, "CACHE_STATUS_")
    if record.cache.match:
        match = _name(common_pb2.CacheMatch, record.cache.match, "CACHE_MATCH_").lower()
        cache += f" ({match}"
        if record.cache.match == common_pb2.CACHE_MATCH_SEMANTIC:
            cache += f", similarity {record.cache.similarity:.3f}"
        cache += ")"
    row("cache", cache)
    if record.sources:
        row("sources", "")
        for source in record.sources:
            lines.append(
                f"  {source.document_id}@{source.version or '-'} chunk {source.chunk}"
                f" (score {source.score:.3f})"
            )
    if record.attempts:
        row("attempts", "")
        for i, attempt in enumerate(record.attempts, 1):
            text = f"  {i}. {attempt.model} {attempt.outcome or '-'} {_ms(attempt.latency)}"
            if attempt.HasField("time_to_first_token"):
                text += f" · first token {_ms(attempt.time_to_first_token)}"
            if attempt.HasField("usage"):
                text += f" · {_usage(attempt.usage)}"
            lines.append(text)
    row("outcome", record.outcome or "-")
    row("finish", _name(common_pb2.FinishReason, record.finish_reason, "FINISH_REASON_").lower())
    row("usage", _usage(record.usage))
    row("cost", _usd(record.cost))
    if record.stages:
        row("stages", " · ".join(f"{s.stage} {_ms(s.duration)}" for s in record.stages))
    row("latency", _ms(record.latency))
    if record.output:
        cut = " (truncated at the capture limit)" if record.output_truncated else ""
        row("output", cut)
        lines.extend("  " + line for line in record.output.splitlines())
    else:
        row("output", "(not captured)")
    return "\n".join(lines)


def _to_dict(message: Any) -> dict[str, Any]:
    result: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def _key(args: argparse.Namespace) -> str:
    return str(args.key or os.environ.get("STRATA_API_KEY", ""))


def run_trace(args: argparse.Namespace) -> int:
    """`strata trace`: exit 0 with the record, 1 on an error, 2 without a key."""
    key = _key(args)
    if not key:
        print("error: no API key: pass --key or set STRATA_API_KEY", file=sys.stderr)
        return 2
    try:
        with grpc.insecure_channel(args.address) as channel:
            record = get_trace(channel, key, args.request_id)
    except grpc.RpcError as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 1
    print(json.dumps(_to_dict(record), indent=2) if args.json else format_record(record))
    return 0


def _side(model: str, finish: int, usage: common_pb2.Usage, cost: common_pb2.Cost) -> list[str]:
    return [
        model or "-",
        _name(common_pb2.FinishReason, finish, "FINISH_REASON_").lower(),
        f"{usage.input_tokens} in / {usage.output_tokens} out",
        _usd(cost),
    ]


def compare(
    record: traces_pb2.RequestRecord,
    reply: orchestrator_pb2.GenerateResponse,
    latency_ms: float,
) -> dict[str, Any]:
    """The original and the replay side by side, and the diff of their outputs."""
    diff = None
    if record.output:
        diff = "\n".join(
            difflib.unified_diff(
                record.output.splitlines(),
                reply.text.splitlines(),
                fromfile=f"original {record.request_id}",
                tofile=f"replay {reply.request_id}",
                lineterm="",
            )
        )
    return {
        "original": {
            "request_id": record.request_id,
            "model": record.model,
            "finish_reason": common_pb2.FinishReason.Name(record.finish_reason),
            "usage": _to_dict(record.usage),
            "cost_usd_micros": record.cost.total_usd_micros,
            "latency_ms": record.latency.ToNanoseconds() / 1e6,
            "prompt_hash": record.prompt.prompt_hash,
            "output": record.output if record.output else None,
        },
        "replay": {
            "request_id": reply.request_id,
            "model": reply.model,
            "finish_reason": common_pb2.FinishReason.Name(reply.finish_reason),
            "usage": _to_dict(reply.usage),
            "cost_usd_micros": reply.cost.total_usd_micros,
            "latency_ms": latency_ms,
            "prompt_hash": reply.prompt.prompt_hash,
            "cache_status": common_pb2.CacheStatus.Name(reply.cache_status),
            "output": reply.text,
        },
        "same_output": record.output == reply.text if record.output else None,
        "diff": diff,
    }


def format_comparison(
    record: traces_pb2.RequestRecord,
    reply: orchestrator_pb2.GenerateResponse,
    latency_ms: float,
) -> str:
    """The comparison, readably."""
    before = _side(record.model, record.finish_reason, record.usage, record.cost)
    before.append(_ms(record.latency))
    after = _side(reply.model, reply.finish_reason, reply.usage, reply.cost)
    after.append(f"{latency_ms:.0f} ms")
    labels = ("model", "finish", "tokens", "cost", "latency")
    width = max(len(v) for v in [*before, "original", record.request_id]) + 2
    lines = [f"{'':<10}{'original':<{width}}replay"]
    lines.append(f"{'request':<10}{record.request_id:<{width}}{reply.request_id}")
    for label, old, new in zip(labels, before, after, strict=True):
        lines.append(f"{label:<10}{old:<{width}}{new}")
    if record.prompt.prompt_hash and reply.prompt.prompt_hash:
        same = record.prompt.prompt_hash == reply.prompt.prompt_hash
        lines.append(f"{'prompt':<10}{'the same' if same else 'differs (sha256)'}")
    lines.append("")
    if not record.output:
        lines.append("The original output was not captured; the replay's:")
        lines.extend("  " + line for line in reply.text.splitlines())
        return "\n".join(lines)
    diff = compare(record, reply, latency_ms)["diff"]
    lines.append(diff or "The output is the same.")
    return "\n".join(lines)


def run_replay(args: argparse.Namespace) -> int:
    """`strata replay`: exit 0 with the comparison, 1 on an error, 2 without a key."""
    key = _key(args)
    if not key:
        print("error: no API key: pass --key or set STRATA_API_KEY", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {key}"),)
    try:
        with grpc.insecure_channel(args.address) as channel:
            record = get_trace(channel, key, args.request_id)
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            started = time.perf_counter()
            reply = stub.Generate(replay_request(record), metadata=metadata, timeout=TIMEOUT_S)
            latency_ms = (time.perf_counter() - started) * 1000
            # The server's own measure, when the replay's record is there already.
            try:
                own = get_trace(channel, key, reply.request_id).latency.ToNanoseconds() / 1e6
                latency_ms = own or latency_ms
            except grpc.RpcError:
                pass
    except grpc.RpcError as err:
        print(f"error: {describe_error(err)}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(compare(record, reply, latency_ms), indent=2))
    else:
        print(format_comparison(record, reply, latency_ms))
    return 0
