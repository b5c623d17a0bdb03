"""PipelineService through real stubs: chained steps, conditions, failure policies, timeouts."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from google.protobuf import json_format, struct_pb2

from strata.orchestrator.v1 import (
    knowledge_pb2,
    knowledge_pb2_grpc,
    pipelines_pb2,
    pipelines_pb2_grpc,
)
from tests.conftest import ROOT, ApiKeys
from tests.grpc.conftest import Served, StartOrchestrator
from tests.helpers import bearer, eventually, rich_error, usage_record

SUCCEEDED, SKIPPED = pipelines_pb2.STEP_STATE_SUCCEEDED, pipelines_pb2.STEP_STATE_SKIPPED
RECOVERED, FAILED = pipelines_pb2.STEP_STATE_RECOVERED, pipelines_pb2.STEP_STATE_FAILED


def say(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


PIPELINES: dict[str, Any] = {
    "pipelines": {
        # generate → extract → (generate when login) → generate with a template.
        "support": {
            "inputs": [
                {"name": "ticket"},
                {"name": "tone", "required": False, "default": "calm"},
            ],
            "steps": [
                {
                    "name": "classify",
                    "kind": "generate",
                    "model": "mock-fast",
                    "temperature": 0,
                    "messages": say("{{ inputs.ticket }} -- billing or login?"),
                },
                {
                    "name": "category",
                    "kind": "extract",
                    "from": "classify",
                    "regex": "(billing|login)",
                },
                {
                    "name": "reset_help",
                    "kind": "generate",
                    "model": "mock-fast",
                    "when": "steps.category.output == 'login'",
                    "messages": say("Explain how a password reset works"),
                },
                {
                    "name": "answer",
                    "kind": "generate",
                    "model": "mock-fast",
                    "template": {"name": "support_answer", "version": "1"},
                    "variables": {
                        "question": "{{ steps.category.output }} case: {{ inputs.ticket }}",
                        "tone": "{{ inputs.tone }}",
                    },
                },
            ],
            "outputs": {
                "category": "{{ steps.category.output }}",
                "answer": "{{ steps.answer.output }}",
            },
        },
        # Failures that the pipeline survives: skip, fallback, a step timeout with fallback.
        "resilient": {
            "steps": [
                {
                    "name": "flaky",
                    "kind": "generate",
                    "model": "mock-error",
                    "messages": say("anyone there?"),
                    "on_failure": "skip",
                },
                {
                    "name": "stuck",
                    "kind": "generate",
                    "model": "mock-hang",
                    "timeout_s": 0.3,
                    "messages": say("answer slowly"),
                    "on_failure": "fallback",
                    "fallback": "no answer in time",
                },
                {
                    "name": "number",
                    "kind": "extract",
                    "from": "stuck",
                    "regex": "([0-9]+)",
                    "on_failure": "fallback",
                    "fallback": {"n": 0},
                },
                {
                    "name": "wrap_up",
                    "kind": "generate",
                    "model": "mock-fast",
                    "messages": say("stuck said {{ steps.stuck.output }}"),
                },
            ],
            "outputs": {
                "flaky": "{{ steps.flaky.output }}",
                "stuck": "{{ steps.stuck.output }}",
                "number": "{{ steps.number.output.n }}",
                "wrap_up": "{{ steps.wrap_up.output }}",
            },
        },
        # A failing step with the default policy stops the pipeline.
        "strict": {
            "steps": [
                {"name": "first", "kind": "generate", "model": "mock-fast", "messages": say("one")},
                {"name": "broken", "kind": "generate", "model": "mock-error", "messages": say("2")},
                {"name": "never", "kind": "generate", "model": "mock-fast", "messages": say("3")},
            ]
        },
        "impatient": {
            "steps": [
                {
                    "name": "stuck",
                    "kind": "generate",
                    "model": "mock-hang",
                    "timeout_s": 0.3,
                    "messages": say("hang on"),
                }
            ]
        },
    }
}


@pytest.fixture
def pipelines_file(tmp_path: Path) -> Path:
    path = tmp_path / "pipelines.yaml"
    path.write_text(yaml.safe_dump(PIPELINES))
    return path


@pytest.fixture
async def served(start_orchestrator: StartOrchestrator, pipelines_file: Path) -> Served:
    return await start_orchestrator(pipelines_file=pipelines_file)


def pipelines(served: Served) -> Any:
    return pipelines_pb2_grpc.PipelineServiceStub(served.channel)


def inputs(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


async def run(
    served: Served, key: str, name: str, **values: Any
) -> pipelines_pb2.RunPipelineResponse:
    reply: pipelines_pb2.RunPipelineResponse = await pipelines(served).RunPipeline(
        pipelines_pb2.RunPipelineRequest(pipeline=name, inputs=inputs(**values)),
        metadata=bearer(key),
        timeout=20,
    )
    return reply


def by_name(result: pipelines_pb2.RunPipelineResponse) -> dict[str, pipelines_pb2.StepResult]:
    return {step.step: step for step in result.steps}


def output(step: pipelines_pb2.StepResult) -> Any:
    return json_format.MessageToDict(step.output) if step.HasField("output") else None


async def test_a_chain_passes_outputs_along_and_its_usage_is_the_sum_of_its_steps(
    served: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    result = await run(served, test_keys.acme, "support", ticket="My billing statement is wrong")
    assert [s.step for s in result.steps] == ["classify", "category", "reset_help", "answer"]
    steps = by_name(result)
    assert [s.state for s in result.steps] == [SUCCEEDED, SUCCEEDED, SKIPPED, SUCCEEDED]
    assert output(steps["classify"]).startswith("Mock answer to “My billing statement")
    assert output(steps["category"]) == "billing"
    assert output(steps["reset_help"]) is None and steps["reset_help"].usage.input_tokens == 0
    # The template's user message ends with the question built from the extracted value,
    # and the mock answer repeats the start of it.
    assert output(steps["answer"]).startswith("Mock answer to “Question: billing case: My")
    assert dict(result.outputs) == {
        "category": "billing",
        "answer": output(steps["answer"]),
    }
    assert all(s.duration.ToNanoseconds() > 0 for s in result.steps if s.state == SUCCEEDED)

    generated = [steps["classify"], steps["answer"]]
    assert all(s.usage.output_tokens > 0 and s.cost.total_usd_micros > 0 for s in generated)
    assert steps["category"].cost.total_usd_micros == 0
    for field in ("input_tokens", "output_tokens"):
        assert getattr(result.usage, field) == sum(getattr(s.usage, field) for s in result.steps)
    for field in ("input_usd_micros", "output_usd_micros", "total_usd_micros"):
        assert getattr(result.cost, field) == sum(getattr(s.cost, field) for s in result.steps)
    # Control charged each generate step once (settled after each step's answer), and
    # nothing else.
    await eventually(lambda: usage_record(redis_db).get("requests", 0) >= 2)
    usage = usage_record(redis_db)
    assert usage["requests"] == 2
    assert usage["spent"] == result.cost.total_usd_micros
    assert usage["input_tokens"] == result.usage.input_tokens
    assert usage["output_tokens"] == result.usage.output_tokens

    login = await run(served, test_keys.acme, "support", ticket="I cannot login to my account")
    assert [s.state for s in login.steps] == [SUCCEEDED] * 4
    assert login.outputs["category"] == "login"


async def test_a_stream_sends_each_step_then_the_result(served: Served, test_keys: ApiKeys) -> None:
    request = pipelines_pb2.StreamPipelineRequest(
        pipeline="support", inputs=inputs(ticket="billing twice this month"), request_id="run-7"
    )
    events = [
        e async for e in pipelines(served).StreamPipeline(request, metadata=bearer(test_keys.acme))
    ]
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["step"] * 4 + ["result"]
    result = events[-1].result
    assert result.request_id == "run-7"
    assert [e.step for e in events[:-1]] == list(result.steps)
    assert result.outputs["category"] == "billing"


async def test_skip_and_fallback_policies_and_a_step_timeout_let_the_pipeline_go_on(
    served: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    result = await run(served, test_keys.acme, "resilient")
    steps = by_name(result)
    assert [s.state for s in result.steps] == [RECOVERED, RECOVERED, RECOVERED, SUCCEEDED]
    assert (steps["flaky"].error_reason, output(steps["flaky"])) == ("PROVIDER_UNAVAILABLE", None)
    assert steps["stuck"].error_reason == "STEP_TIMEOUT"
    assert output(steps["stuck"]) == "no answer in time"
    assert 0.3 <= steps["stuck"].duration.ToNanoseconds() / 1e9 < 2.0
    assert steps["number"].error_reason == "STEP_INVALID"
    assert output(steps["number"]) == {"n": 0}
    assert output(steps["wrap_up"]).startswith("Mock answer to “stuck said no answer in time”")
    assert dict(result.outputs) == {
        "flaky": "None",
        "stuck": "no answer in time",
        "number": "0",
        "wrap_up": output(steps["wrap_up"]),
    }
    assert result.cost.total_usd_micros == steps["wrap_up"].cost.total_usd_micros > 0


async def test_a_failing_step_stops_the_pipeline_with_its_reason(
    served: Served, test_keys: ApiKeys
) -> None:
    events = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in pipelines(served).StreamPipeline(
            pipelines_pb2.StreamPipelineRequest(pipeline="strict"),
            metadata=bearer(test_keys.acme),
            timeout=20,
        ):
            events.append(event)
    error = rich_error(caught.value)
    assert error.reason == "PROVIDER_UNAVAILABLE"
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.metadata == {"pipeline": "strict", "step": "broken"}
    assert [(e.step.step, e.step.state) for e in events] == [
        ("first", SUCCEEDED),
        ("broken", FAILED),
    ]
    assert events[1].step.error_reason == "PROVIDER_UNAVAILABLE"

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(served, test_keys.acme, "impatient")
    error = rich_error(caught.value)
    assert error.reason == "STEP_TIMEOUT"
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert error.metadata == {"pipeline": "impatient", "step": "stuck"}


@pytest.mark.parametrize(
    ("name", "values", "code", "reason", "fields"),
    [
        ("nope", {}, grpc.StatusCode.NOT_FOUND, "PIPELINE_NOT_FOUND", []),
        ("support", {}, grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID", ["inputs.ticket"]),
        (
            "support",
            {"ticket": "x", "colour": "red"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_INVALID",
            ["inputs.colour"],
        ),
    ],
    ids=["unknown-pipeline", "missing-input", "unknown-input"],
)
async def test_bad_pipeline_calls_are_refused_before_any_step_runs(
    served: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    name: str,
    values: dict[str, Any],
    code: grpc.StatusCode,
    reason: str,
    fields: list[str],
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await run(served, test_keys.acme, name, **values)
    error = rich_error(caught.value)
    assert (error.code, error.reason, error.field_violations) == (code, reason, fields)
    assert usage_record(redis_db) == {}


async def test_the_shipped_triage_pipeline_answers_from_retrieved_documents(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys
) -> None:
    served = await start_orchestrator(
        pipelines_file=ROOT / "config" / "pipelines.yaml",
        routes_file=ROOT / "config" / "routes.yaml",
    )
    knowledge = knowledge_pb2_grpc.KnowledgeServiceStub(served.channel)
    upsert = knowledge_pb2.UpsertDocumentsRequest(
        request_id=uuid.uuid4().hex,
        collection="faq",
        documents=[
            knowledge_pb2.Document(
                id="refunds", version="3", text="Billing refunds reach your card in five days."
            ),
            knowledge_pb2.Document(
                id="login", version="1", text="Reset a forgotten password from the login page."
            ),
        ],
    )
    async for _ in knowledge.UpsertDocuments(upsert, metadata=bearer(test_keys.acme)):
        pass
    result = await run(
        served, test_keys.acme, "triage", ticket="Where is my billing refund?", product="Acme"
    )
    steps = by_name(result)
    assert [s.state for s in result.steps] == [SUCCEEDED] * 4
    assert result.outputs["category"] == "billing"
    passages = output(steps["passages"])
    assert passages[0]["document_id"] == "refunds" and passages[0]["version"] == "3"
    assert {p["document_id"] for p in passages} == {"refunds", "login"}
    # support_answer v2 numbers the documents in the user message, which the mock repeats.
    assert str(result.outputs["answer"]).startswith("Mock answer to “[1] (refunds) Billing refunds")
