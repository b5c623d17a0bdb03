"""Traces and metrics as an operator sees them: the four service processes export over
OTLP/gRPC to a real receiver (tests/otlp_receiver.py), and one request is one trace.

Three stacks, started together: `traced` (content not captured, Prometheus endpoint on the
executor), `capturing` (prompts and answers captured, cut at a few hundred bytes) and `dark`
(its collector's port is closed: requests must not notice).
"""

from __future__ import annotations

import secrets
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.devstack import SERVICES, LocalStack, free_port
from tests.conftest import ApiKeys
from tests.helpers import bearer, user
from tests.otlp_receiver import OtlpReceiver, SpanRecord

MODEL = "mock-fast"
UPSTREAM_MODEL = "echo"
"""mock-fast's model at the provider (config/models.yaml)."""
CONTENT_MAX_BYTES = 300
EVENT_CONTENT = "gen_ai.client.inference.operation.details"
ORCHESTRATOR_SPAN = "strata.orchestrator.v1.OrchestratorService/StreamGenerate"
ORCHESTRATOR_STEPS = {"admission", "cache lookup", "cache store", "settlement"}
"""The orchestrator's own spans for a cache miss without retrieval."""
CALLEE_SPANS = {
    "strata-control": "strata.control.v1.ControlService/Admit",
    "strata-cache": "strata.cache.v1.CacheService/Lookup",
    "strata-executor": "strata.executor.v1.ExecutorService/StreamComplete",
}


@dataclass
class Stacks:
    traced: LocalStack
    capturing: LocalStack
    dark: LocalStack
    executor_metrics_port: int


def telemetry_env(endpoint: str, **settings: str) -> dict[str, str]:
    """The same telemetry settings for all four services."""
    values = {"OTLP_ENDPOINT": endpoint, "METRIC_EXPORT_INTERVAL_S": "1", **settings}
    return {f"STRATA_{s.upper()}_{k}": v for s in SERVICES for k, v in values.items()}


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def stacks(
    tmp_path_factory: pytest.TempPathFactory,
    receiver: OtlpReceiver,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
    guardrails_file: Path,
) -> Iterator[Stacks]:
    guardrails = {
        "STRATA_CONTROL_GUARDRAILS_FILE": str(guardrails_file),
        "STRATA_ORCHESTRATOR_GUARDRAILS_FILE": str(guardrails_file),
    }
    metrics_port = free_port()
    closed_port = free_port()
    envs = {
        "traced": {
            **telemetry_env(receiver.endpoint),
            "STRATA_EXECUTOR_METRICS_PORT": str(metrics_port),
        },
        "capturing": telemetry_env(
            receiver.endpoint, CAPTURE_CONTENT="true", CONTENT_MAX_BYTES=str(CONTENT_MAX_BYTES)
        ),
        "dark": telemetry_env(f"http://127.0.0.1:{closed_port}", OTLP_TIMEOUT_S="0.5"),
    }
    made = {
        name: LocalStack(
            run_dir=tmp_path_factory.mktemp(f"stack-{name}"),
            models_file=models_file,
            tenants_file=tenants_file,
            redis_url=redis_url,
            env={**guardrails, **env},
        )
        for name, env in envs.items()
    }
    # Started side by side: each start is a few seconds of imports.
    failures: list[BaseException] = []

    def start(stack: LocalStack) -> None:
        try:
            stack.start()
        except BaseException as err:
            failures.append(err)

    threads = [threading.Thread(target=start, args=(stack,)) for stack in made.values()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        if failures:
            raise failures[0]
        yield Stacks(**made, executor_metrics_port=metrics_port)
    finally:
        for stack in made.values():
            stack.stop()


@dataclass
class Call:
    """One StreamGenerate made under the test's own trace context."""

    trace_id: str
    parent_span_id: str
    """The span id the test sent as the caller's."""
    prompt: str
    chunks: list[orchestrator_pb2.StreamGenerateResponse]

    @property
    def final(self) -> orchestrator_pb2.StreamGenerateResponse.Final:
        return self.chunks[-1].final

    @property
    def text(self) -> str:
        return "".join(c.delta.text for c in self.chunks if c.HasField("delta"))


def generate(
    stack: LocalStack,
    key: str,
    prompt: str,
    cache_mode: common_pb2.CacheMode = common_pb2.CACHE_MODE_READ_WRITE,
    **params: Any,
) -> Call:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    request = orchestrator_pb2.StreamGenerateRequest(
        model=MODEL,
        messages=[user(prompt)],
        params=common_pb2.GenerationParams(**params),
        cache_policy=common_pb2.CachePolicy(mode=cache_mode),
    )
    metadata = [*bearer(key), ("traceparent", f"00-{trace_id}-{span_id}-01")]
    with grpc.insecure_channel(stack.addresses["orchestrator"]) as channel:
        api = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        chunks = list(api.StreamGenerate(request, metadata=metadata, timeout=20))
    assert chunks and chunks[-1].HasField("final"), chunks
    return Call(trace_id, span_id, prompt, chunks)


def named(spans: list[SpanRecord], service: str, name: str) -> list[SpanRecord]:
    return [s for s in spans if s.service == service and s.name == name]


def chat_spans(spans: list[SpanRecord]) -> list[SpanRecord]:
    return [s for s in spans if s.service == "strata-executor" and s.name.startswith("chat ")]


def wait_for_trace(receiver: OtlpReceiver, call: Call) -> list[SpanRecord]:
    """The call's trace, once its server spans and its chat span have all arrived and every
    span's parent is in the trace (or is the test's own span)."""

    def whole(r: OtlpReceiver) -> bool:
        spans = r.trace(call.trace_id)
        ids = {s.span_id for s in spans} | {call.parent_span_id}
        return (
            bool(named(spans, "strata-orchestrator", ORCHESTRATOR_SPAN))
            and {s.name for s in spans if s.service == "strata-orchestrator"} >= ORCHESTRATOR_STEPS
            and all(named(spans, svc, name) for svc, name in CALLEE_SPANS.items())
            and bool(chat_spans(spans))
            and all(s.parent_span_id in ids for s in spans)
        )

    try:
        receiver.wait_for(whole, timeout=10, message=f"the whole trace {call.trace_id}")
    except AssertionError as err:
        raise AssertionError(f"{err}\n{describe(receiver.trace(call.trace_id))}") from None
    return receiver.trace(call.trace_id)


def describe(spans: list[SpanRecord]) -> str:
    """The spans as an indented tree (orphans at the top level), for failure messages."""
    ids = {s.span_id for s in spans}
    lines: list[str] = []

    def walk(parent: str, depth: int) -> None:
        for span in spans:
            if span.parent_span_id == parent or (depth == 0 and span.parent_span_id not in ids):
                lines.append(
                    f"{'  ' * depth}{span.service} {span.name!r} {span.kind} "
                    f"id={span.span_id} parent={span.parent_span_id or '-'}"
                )
                walk(span.span_id, depth + 1)

    walk("\0", 0)
    return "\n".join(lines)


def strings_in(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from strings_in(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)


def recorded_strings(span: SpanRecord) -> Iterator[str]:
    """Every string a span carries: attributes, event names and event attributes."""
    yield from strings_in(span.attributes)
    for event in span.events:
        yield event.name
        yield from strings_in(event.attributes)


@pytest.fixture(scope="module")
def traced_call(stacks: Stacks, test_keys: ApiKeys) -> Call:
    """A cache miss on the traced stack, its prompt marked so it can be looked for."""
    marker = uuid.uuid4().hex
    return generate(
        stacks.traced,
        test_keys.acme,
        f"tracing probe {marker} please",
        temperature=0.5,
        max_output_tokens=64,
    )


def test_one_request_is_one_trace_over_the_four_services(
    receiver: OtlpReceiver, traced_call: Call
) -> None:
    spans = wait_for_trace(receiver, traced_call)
    assert {s.service for s in spans} >= {
        "strata-orchestrator",
        "strata-control",
        "strata-cache",
        "strata-executor",
    }
    [root] = named(spans, "strata-orchestrator", ORCHESTRATOR_SPAN)
    assert root.kind == "SERVER"
    assert root.parent_span_id == traced_call.parent_span_id
    by_id = {s.span_id: s for s in spans}
    for service, name in CALLEE_SPANS.items():
        [served] = named(spans, service, name)
        assert served.kind == "SERVER"
        caller = by_id.get(served.parent_span_id)
        assert caller is not None, f"{name}'s parent {served.parent_span_id} is not in the trace"
        assert caller.service == "strata-orchestrator", (name, caller)
    steps = [s for s in spans if s.service == "strata-orchestrator" and s.span_id != root.span_id]
    assert {s.name for s in steps} >= ORCHESTRATOR_STEPS
    assert all(s.parent_span_id == root.span_id for s in steps if s.name in ORCHESTRATOR_STEPS)
    step = {s.name: s.attributes for s in steps}
    assert step["admission"]["strata.admission.decision"] == "admitted"
    assert step["cache lookup"]["strata.cache.result"] == "miss"
    assert root.attributes["strata.request_id"] == traced_call.chunks[0].start.request_id
    assert (root.attributes["strata.model"], root.attributes["strata.tenant_id"]) == (MODEL, "acme")
    # Only the test's span is outside the trace: every other span hangs under the root.
    assert [s.name for s in spans if s.parent_span_id not in by_id] == [ORCHESTRATOR_SPAN]


def test_the_chat_span_carries_the_gen_ai_attributes(
    receiver: OtlpReceiver, traced_call: Call
) -> None:
    spans = wait_for_trace(receiver, traced_call)
    [server] = named(spans, "strata-executor", CALLEE_SPANS["strata-executor"])
    [chat] = chat_spans(spans)
    assert chat.kind == "CLIENT"
    assert chat.parent_span_id == server.span_id
    attrs = chat.attributes
    assert attrs["gen_ai.operation.name"] == "chat"
    # Not a well-known provider: the name is namespaced, as the conventions ask.
    assert attrs["gen_ai.provider.name"] == "strata.mock"
    assert attrs["gen_ai.request.model"] == MODEL
    assert chat.name == f"chat {MODEL}"
    assert attrs["gen_ai.response.model"] == f"mock/{UPSTREAM_MODEL}"  # as the mock reports it
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.5)
    assert attrs["gen_ai.request.max_tokens"] == 64
    usage = traced_call.final.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert attrs["gen_ai.usage.input_tokens"] == usage.input_tokens
    assert attrs["gen_ai.usage.output_tokens"] == usage.output_tokens
    finish = common_pb2.FinishReason.Name(traced_call.final.finish_reason)
    assert list(attrs["gen_ai.response.finish_reasons"]) == [
        finish.removeprefix("FINISH_REASON_").lower()
    ]
    assert attrs["strata.time_to_first_token_s"] >= 0
    assert "error.type" not in attrs
    assert chat.status != "ERROR"


def test_content_is_not_recorded_by_default(receiver: OtlpReceiver, traced_call: Call) -> None:
    spans = wait_for_trace(receiver, traced_call)
    marker = traced_call.prompt.split()[2]
    assert marker in traced_call.text  # the mock echoes the prompt: the answer holds it too
    for span in receiver.spans():
        assert not any(marker in text for text in recorded_strings(span)), span
    assert not [s for s in spans if EVENT_CONTENT in {e.name for e in s.events}]


def content_event(spans: list[SpanRecord]) -> tuple[SpanRecord, dict[str, Any]]:
    [chat] = chat_spans(spans)
    [event] = [e for e in chat.events if e.name == EVENT_CONTENT]
    return chat, event.attributes


def test_captured_content_is_redacted(
    receiver: OtlpReceiver, stacks: Stacks, test_keys: ApiKeys
) -> None:
    marker = uuid.uuid4().hex[:12]
    call = generate(stacks.capturing, test_keys.acme, f"Mail jane.doe@example.com re {marker}")
    spans = wait_for_trace(receiver, call)
    _, attrs = content_event(spans)
    prompt = attrs["gen_ai.input.messages"]
    assert marker in prompt and "[REDACTED:" in prompt, prompt
    assert "gen_ai.output.messages" in attrs
    assert len(prompt.encode()) <= CONTENT_MAX_BYTES
    for span in spans:
        assert not any("jane.doe@example.com" in t for t in recorded_strings(span)), span


def test_captured_content_is_cut_at_the_limit(
    receiver: OtlpReceiver, stacks: Stacks, test_keys: ApiKeys
) -> None:
    marker = uuid.uuid4().hex[:12]
    prompt = f"long {marker} " + " ".join(f"word{n}" for n in range(400))
    call = generate(stacks.capturing, test_keys.acme, prompt)
    chat, attrs = content_event(wait_for_trace(receiver, call))
    assert len(attrs["gen_ai.input.messages"].encode()) <= CONTENT_MAX_BYTES
    assert marker in attrs["gen_ai.input.messages"]
    assert "word399" not in attrs["gen_ai.input.messages"]
    assert True in (
        attrs.get("strata.content.truncated"),
        chat.attributes.get("strata.content.truncated"),
    ), (attrs, chat.attributes)


def test_metrics_reach_the_collector_and_the_scrape_endpoint(
    receiver: OtlpReceiver, stacks: Stacks, traced_call: Call
) -> None:
    wanted = {"gen_ai.client.token.usage", "gen_ai.client.operation.duration"}
    receiver.wait_for(
        lambda r: wanted <= r.metric_names("strata-executor"),
        timeout=10,
        message=f"executor metrics {sorted(wanted)}",
    )
    url = f"http://127.0.0.1:{stacks.executor_metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        scraped = response.read().decode()
    assert "gen_ai_client_token_usage" in scraped
    assert "gen_ai_client_operation_duration" in scraped


def test_a_collector_that_is_down_changes_nothing_for_the_caller(
    stacks: Stacks, test_keys: ApiKeys
) -> None:
    prompt = f"same answer with or without a collector {uuid.uuid4().hex}"
    seen = [
        generate(stack, test_keys.acme, prompt, common_pb2.CACHE_MODE_BYPASS, seed=7)
        for stack in (stacks.traced, stacks.dark)
    ]
    traced, dark = seen
    assert dark.text == traced.text and dark.text
    assert dark.final.finish_reason == traced.final.finish_reason == common_pb2.FINISH_REASON_STOP
    assert dark.final.usage == traced.final.usage
    assert dark.chunks[0].start.cache_status == common_pb2.CACHE_STATUS_BYPASS
    assert all(
        s.process is not None and s.process.poll() is None for s in stacks.dark.services.values()
    )


def test_services_stop_cleanly_and_promptly_with_telemetry_on(stacks: Stacks) -> None:
    """Last in the module: it stops the stacks (their fixture's stop is then a no-op).
    SIGTERM flushes what is queued; neither the flush nor a closed collector port may turn
    into a slow or failed shutdown. (Exit codes are not compared: LocalStack.stop sends a
    second SIGTERM to a process still exiting, which then ends with -15.)"""
    for name in ("traced", "capturing", "dark"):
        stack: LocalStack = getattr(stacks, name)
        processes = dict(stack.services)
        began = time.monotonic()
        stack.stop()
        took = time.monotonic() - began
        assert took < 8, (name, took)
        for service, process in processes.items():
            log = process.log_path.read_text()
            assert f"{service} stopped" in log, (name, service, log[-2000:])
            assert "Traceback" not in log, (name, service, log[log.index("Traceback") :])
