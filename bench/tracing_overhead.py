"""Latency tracing adds to a request: unary Generate with spans exported vs not (p50, p95).

    .venv/bin/python -m bench.tracing_overhead [--requests 300] [--round 20]
    .venv/bin/python -m bench.tracing_overhead --span-cost

Starts the four services as processes twice, side by side on one Redis: `off` with no
OTLP endpoint (no span is built; trace context is carried) and `on`
exporting traces and metrics to an OTLP/gRPC receiver in this process
(tests/otlp_receiver.py). Sends `--requests` sequential Generate calls to each, on the mock
model with the cache bypassed, in alternating rounds of `--round` calls (the order flips
every round) so that the machine's drift falls on both alike. Timings on a shared machine
are noisy; compare the medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import grpc
import yaml
from opentelemetry.sdk.trace import TracerProvider

from bench.harness import bench_redis, percentile
from services.common import telemetry
from services.control.keys import new_key
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.devstack import SERVICES, LocalStack
from tests.otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parent.parent
MODEL = "mock-fast"
CONFIGS = ("off", "on")


@contextmanager
def running(stack: LocalStack) -> Iterator[LocalStack]:
    stack.start()
    try:
        yield stack
    finally:
        stack.stop()


def tenants(directory: Path) -> tuple[str, Path]:
    """A tenant whose key's limits the benchmark never reaches; its key and the file."""
    key, digest = new_key()
    entry = {"id": "bench-main", "sha256": digest, "requests_per_minute": 1_000_000}
    path = directory / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": {"bench": {"keys": [entry]}}}))
    return key, path


def call(api: orchestrator_pb2_grpc.OrchestratorServiceStub, key: str) -> float:
    """One Generate; its latency in ms."""
    request = orchestrator_pb2.GenerateRequest(
        model=MODEL,
        messages=[
            common_pb2.ChatMessage(
                role=common_pb2.ROLE_USER, content=f"tracing overhead {uuid.uuid4().hex[:8]}"
            )
        ],
        cache_policy=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_BYPASS),
    )
    started = time.perf_counter()
    api.Generate(request, metadata=[("authorization", f"Bearer {key}")], timeout=30)
    return (time.perf_counter() - started) * 1000


def span_cost(spans: int = 50_000, rounds: int = 5) -> None:
    """CPU per span with two attributes in a service without an exporter: built and thrown
    away (the SDK's plain provider, as before Strata stopped building them) and not built
    (Strata's provider), in alternating rounds."""
    tracers = {
        "built": TracerProvider().get_tracer("bench"),
        "not built": telemetry.configure("bench-unexported").tracer,
    }
    costs: dict[str, list[float]] = {name: [] for name in tracers}
    for _ in range(rounds):
        for name, tracer in tracers.items():
            began = time.process_time()
            for _ in range(spans):
                with tracer.start_as_current_span("step", attributes={"a": 1}) as span:
                    span.set_attribute("b", "c")
            costs[name].append((time.process_time() - began) / spans * 1e6)
    for name, values in costs.items():
        print(f"{name:>10}: {statistics.median(values):6.1f} µs of CPU per span (median)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="Generate calls per config")
    parser.add_argument("--round", type=int, default=20, help="calls per config per round")
    parser.add_argument("--warmup", type=int, default=20, help="untimed calls per config")
    parser.add_argument("--span-cost", action="store_true", help="only the CPU of one span")
    args = parser.parse_args()
    if args.span_cost:
        span_cost()
        return 0
    with ExitStack() as stack:
        redis_url = stack.enter_context(bench_redis())
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        receiver = stack.enter_context(OtlpReceiver())
        key, tenants_file = tenants(directory)
        envs = {
            "off": {},
            "on": {f"STRATA_{s.upper()}_OTLP_ENDPOINT": receiver.endpoint for s in SERVICES},
        }
        stubs = {}
        for name in CONFIGS:
            print(f"==> starting the stack with tracing {name}", file=sys.stderr)
            started = stack.enter_context(
                running(
                    LocalStack(
                        run_dir=directory / name,
                        models_file=ROOT / "config" / "models.yaml",
                        tenants_file=tenants_file,
                        redis_url=redis_url,
                        env=envs[name],
                    )
                )
            )
            channel = stack.enter_context(grpc.insecure_channel(started.addresses["orchestrator"]))
            stubs[name] = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for name in CONFIGS:
            for _ in range(args.warmup):
                call(stubs[name], key)
        samples: dict[str, list[float]] = {name: [] for name in CONFIGS}
        rounds = -(-args.requests // args.round)
        for number in range(rounds):
            order = CONFIGS if number % 2 == 0 else CONFIGS[::-1]
            for name in order:
                size = min(args.round, args.requests - len(samples[name]))
                samples[name].extend(call(stubs[name], key) for _ in range(size))
            if (number + 1) % 5 == 0 or number + 1 == rounds:
                done = len(samples["on"])
                print(f"    {done}/{args.requests} calls per config", file=sys.stderr)
        spans = len(receiver.spans())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name in CONFIGS:
        values = samples[name]
        print(
            f"tracing {name:<3}  p50 {medians[name]:6.2f} ms   "
            f"p95 {percentile(values, 0.95):6.2f} ms   ({len(values)} Generate calls)"
        )
    print(
        f"on/off p50 ratio {medians['on'] / medians['off']:.3f}   "
        f"({medians['on'] - medians['off']:+.2f} ms; {spans} spans received)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
