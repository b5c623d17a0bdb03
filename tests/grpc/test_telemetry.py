"""Traces across the four services, in process: one trace per request, correct parents,
GenAI attributes on the model call, no content unless asked for.

(The stack layer checks the same over OTLP with the services as separate processes.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.common import telemetry
from services.control.admission import AdmissionControl
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2
from strata.orchestrator.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    orchestrator_pb2,
    pipelines_pb2,
    pipelines_pb2_grpc,
)
from tests.conftest import ApiKeys
from tests.grpc.conftest import Served, StartOrchestrator
from tests.helpers import bearer, eventually, handed_over, usage_record, user

SERVICES = ("orchestrator", "control", "cache", "executor")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def spans(orchestrator: Served) -> Iterator[InMemorySpanExporter]:
    """Every span the four in-process services end from now on."""
    exporter = InMemorySpanExporter()
    for service in SERVICES:
        telemetry.of(service).tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield exporter
    exporter.shutdown()


async def finished(
    spans: InMemorySpanExporter, done: Callable[[list[ReadableSpan]], bool]
) -> list[ReadableSpan]:
    """The finished spans, once `done` holds for them (some end after the last chunk)."""
    async with asyncio.timeout(5):
        while not done(found := list(spans.get_finished_spans())):
            await asyncio.sleep(0.02)
    return found


def service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"]).removeprefix("strata-")


def trace_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return format(span.context.trace_id, "032x")


def by_id(found: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in found if s.context is not None}


def parent_of(span: ReadableSpan, index: dict[int, ReadableSpan]) -> ReadableSpan:
    assert span.parent is not None, span.name
    return index[span.parent.span_id]


def named(found: list[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in found if s.name == name]
    return span


async def stream(served: Served, key: str, text: str, **params: Any) -> list[Any]:
    call = served.stub.StreamGenerate(
        orchestrator_pb2.StreamGenerateRequest(
            model="mock-fast",
            messages=[user(text)],
            params=common_pb2.GenerationParams(**params),
        ),
        metadata=[*bearer(key), ("traceparent", TRACEPARENT)],
        timeout=10,
    )
    return [chunk async for chunk in call]


async def test_a_streamed_request_is_one_trace_over_the_four_services(
    orchestrator: Served, test_keys: ApiKeys, spans: InMemorySpanExporter
) -> None:
    chunks = await stream(orchestrator, test_keys.acme, "trace me", temperature=0.2, seed=3)
    final = chunks[-1].final
    settled = "strata.control.v1.ControlService/Settle"
    found = await finished(spans, lambda f: any(s.name == settled for s in f))
    found = [s for s in found if trace_id(s) == TRACEPARENT[3:35]]
    assert {service_of(s) for s in found} == set(SERVICES)
    index = by_id(found)
    root = named(found, "strata.orchestrator.v1.OrchestratorService/StreamGenerate")
    assert root.kind == SpanKind.SERVER
    assert root.parent is not None and format(root.parent.span_id, "016x") == TRACEPARENT[36:52]
    assert root.attributes is not None
    assert root.attributes["strata.tenant_id"] == "acme"
    assert root.attributes["strata.model"] == "mock-fast"

    # Each hop's SERVER span hangs under the orchestrator's span for that step.
    admit = named(found, "strata.control.v1.ControlService/Admit")
    assert parent_of(admit, index).name == "admission"
    assert parent_of(parent_of(admit, index), index) is root
    lookup = named(found, "strata.cache.v1.CacheService/Lookup")
    assert parent_of(lookup, index).name == "cache lookup"
    settle = named(found, "strata.control.v1.ControlService/Settle")
    assert parent_of(settle, index).name == "settlement"
    executor = named(found, "strata.executor.v1.ExecutorService/StreamComplete")
    assert parent_of(executor, index) is root

    chat = named(found, "chat mock-fast")
    assert chat.kind == SpanKind.CLIENT
    assert parent_of(chat, index) is executor
    attributes = dict(chat.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "strata.mock"
    assert attributes["gen_ai.request.model"] == "mock-fast"
    assert attributes["gen_ai.request.temperature"] == pytest.approx(0.2)
    assert attributes["gen_ai.usage.input_tokens"] == final.usage.input_tokens
    assert attributes["gen_ai.usage.output_tokens"] == final.usage.output_tokens
    assert attributes["gen_ai.response.finish_reasons"] == ("stop",)
    assert isinstance(ttft := attributes["strata.time_to_first_token_s"], float) and ttft >= 0
    # Content is off by default: the prompt appears nowhere.
    for span in found:
        assert "trace me" not in repr(dict(span.attributes or {}))
        assert all("trace me" not in repr(dict(e.attributes or {})) for e in span.events)


async def test_a_failed_model_call_carries_its_error_type(
    orchestrator: Served, test_keys: ApiKeys, spans: InMemorySpanExporter
) -> None:
    call = orchestrator.stub.Generate(
        orchestrator_pb2.GenerateRequest(model="mock-error", messages=[user("fail")]),
        metadata=bearer(test_keys.acme),
        timeout=10,
    )
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    found = await finished(spans, lambda f: any(s.name == "chat mock-error" for s in f))
    chats = [s for s in found if s.name == "chat mock-error"]
    assert all((s.attributes or {}).get("error.type") == "PROVIDER_UNAVAILABLE" for s in chats)


async def test_settlements_that_pile_up_go_as_one_batch_each_in_its_own_trace(
    orchestrator: Served,
    test_keys: ApiKeys,
    spans: InMemorySpanExporter,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Control holds the first settlement it gets: the others pile up in the orchestrator.
    gate, held = asyncio.Event(), asyncio.Event()
    settle_checked = AdmissionControl._settle_checked

    async def first_held(self: AdmissionControl, request: Any) -> bool:
        if not held.is_set():
            held.set()
            await gate.wait()
        return await settle_checked(self, request)

    monkeypatch.setattr(AdmissionControl, "_settle_checked", first_held)
    handed = handed_over(monkeypatch, control_pb2.SettleRequest)
    traces = [f"{n:032x}" for n in range(1, 5)]
    for trace in traces:  # one after another: each settles after its reply
        await orchestrator.stub.Generate(
            orchestrator_pb2.GenerateRequest(model="mock-fast", messages=[user(f"q {trace}")]),
            metadata=[*bearer(test_keys.acme), ("traceparent", f"00-{trace}-b7ad6b7169203331-01")],
            timeout=10,
        )
        if trace == traces[0]:
            await asyncio.wait_for(held.wait(), 5)
    await eventually(lambda: len(handed) == 4)
    gate.set()
    found = await finished(spans, lambda f: sum(s.name == "settle" for s in f) == 3)
    index = by_id(found)

    batch = named(found, "strata.control.v1.ControlService/SettleBatch")
    sent = parent_of(batch, index)
    assert sent.name == "settlement batch" and sent.parent is None  # a trace of its own
    assert sent.attributes is not None and sent.attributes["strata.batch.size"] == 3
    linked = {format(link.context.trace_id, "032x") for link in sent.links}
    assert linked == set(traces[1:])
    for trace in traces[1:]:
        [entry] = [s for s in found if s.name == "settle" and trace_id(s) == trace]
        assert service_of(entry) == "control"
        assert parent_of(entry, index).name == "settlement"  # the request's own span
        assert service_of(parent_of(entry, index)) == "orchestrator"
    alone = [s for s in found if s.name == "strata.control.v1.ControlService/Settle"]
    assert [trace_id(s) for s in alone] == traces[:1]
    await eventually(lambda: usage_record(redis_db).get("requests") == 4)
    assert redis_db.hlen("strata:{t:acme}:reservations") == 0


def test_captured_content_is_redacted_and_cut() -> None:
    text, cut = telemetry.capture("write to jane.doe@example.com about the invoice", 4096)
    assert "jane.doe@example.com" not in text and "invoice" in text
    assert not cut
    text, cut = telemetry.capture("é" * 100, 11)
    assert cut and text == "é" * 5  # cut on a character boundary


async def test_a_job_runs_in_its_own_trace_linked_to_the_submitting_request(
    orchestrator: Served, test_keys: ApiKeys, spans: InMemorySpanExporter
) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(orchestrator.channel)
    submitted = await jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(
            request_id="traced-job",
            generate=orchestrator_pb2.GenerateRequest(
                model="mock-fast", messages=[user("a job to trace")]
            ),
        ),
        metadata=[*bearer(test_keys.acme), ("traceparent", TRACEPARENT)],
        timeout=5,
    )
    job_id = submitted.job.job_id

    found = await finished(spans, lambda f: any(s.name == "job" for s in f))
    [job] = [s for s in found if s.name == "job"]
    assert job.parent is None  # a trace of its own ...
    [link] = job.links  # ... linked to the request that submitted it
    assert format(link.context.trace_id, "032x") == TRACEPARENT[3:35]
    assert (job.attributes or {})["strata.job_id"] == job_id
    # The job's model call is in the job's trace.
    chats = [s for s in found if s.name == "chat mock-fast" and trace_id(s) == trace_id(job)]
    assert len(chats) == 1


async def test_each_pipeline_step_is_a_span(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys, tmp_path: Path
) -> None:
    path = tmp_path / "pipelines.yaml"
    say = [{"role": "user", "content": "one"}]
    path.write_text(
        yaml.safe_dump(
            {
                "pipelines": {
                    "strict": {
                        "steps": [
                            {
                                "name": "first",
                                "kind": "generate",
                                "model": "mock-fast",
                                "messages": say,
                            },
                            {
                                "name": "broken",
                                "kind": "generate",
                                "model": "mock-error",
                                "messages": say,
                            },
                        ]
                    }
                }
            }
        )
    )
    served = await start_orchestrator(pipelines_file=path)
    exporter = InMemorySpanExporter()
    telemetry.of("orchestrator").tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
    pipelines = pipelines_pb2_grpc.PipelineServiceStub(served.channel)
    with pytest.raises(grpc.aio.AioRpcError):
        await pipelines.RunPipeline(
            pipelines_pb2.RunPipelineRequest(pipeline="strict"),
            metadata=[*bearer(test_keys.acme), ("traceparent", TRACEPARENT)],
            timeout=10,
        )
    found = await finished(exporter, lambda f: any(s.name == "pipeline step broken" for s in f))
    steps = {s.name: s for s in found if s.name.startswith("pipeline step")}
    assert set(steps) == {"pipeline step first", "pipeline step broken"}
    assert all(trace_id(s) == TRACEPARENT[3:35] for s in steps.values())
    assert (steps["pipeline step first"].attributes or {})["strata.state"] == "succeeded"
    broken = steps["pipeline step broken"].attributes or {}
    assert (broken["strata.state"], broken["error.type"]) == ("failed", "PROVIDER_UNAVAILABLE")
