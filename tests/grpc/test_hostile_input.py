"""Hostile requests against every service: refused with INVALID_ARGUMENT / REQUEST_INVALID
and a field violation naming the field, no traceback, and nothing charged or stored (the
whole Redis database is the same afterwards)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2, struct_pb2

from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2
from strata.executor.v1 import executor_pb2
from strata.orchestrator.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    orchestrator_pb2,
    pipelines_pb2,
    pipelines_pb2_grpc,
    traces_pb2,
    traces_pb2_grpc,
)
from tests.conftest import ApiKeys
from tests.grpc.conftest import Served
from tests.helpers import bearer, rich_error, state_snapshot, user

NAN, INF = float("nan"), float("inf")
DEEP_JSON = '{"a":' + "[" * 10_000 + "]" * 10_000 + "}"
TRACEBACK_MARKS = ("Traceback", 'File "', "Error parsing", "Exception")


def unknown(number: int) -> Any:
    """An enum number this build does not define (proto3 keeps it; the stubs' types do not)."""
    return number


def params(**kw: Any) -> common_pb2.GenerationParams:
    return common_pb2.GenerationParams(**kw)


def deep_struct(depth: int) -> struct_pb2.Struct:
    inner: dict[str, Any] = {"x": 1}
    for _ in range(depth):
        inner = {"x": inner}
    made = struct_pb2.Struct()
    made.update(inner)
    return made


def struct(**values: Any) -> struct_pb2.Struct:
    made = struct_pb2.Struct()
    made.update(values)
    return made


def generate(**kw: Any) -> orchestrator_pb2.GenerateRequest:
    """A valid request unless `kw` spoils it; a request id makes idempotency part of the path."""
    fields: dict[str, Any] = {
        "model": "mock-fast",
        "messages": [user("hello")],
        "request_id": "hostile-1",
        **kw,
    }
    return orchestrator_pb2.GenerateRequest(**fields)


def spoiled(**kw: Any) -> Callable[[orchestrator_pb2.GenerateRequest], None]:
    def spoil(request: orchestrator_pb2.GenerateRequest) -> None:
        for name, value in kw.items():
            setattr(request, name, value)

    return spoil


def with_message(**kw: Any) -> orchestrator_pb2.GenerateRequest:
    return generate(messages=[common_pb2.ChatMessage(**{"role": common_pb2.ROLE_USER, **kw})])


@dataclass(frozen=True)
class Case:
    id: str
    request: Any
    field: str


GENERATE_CASES = [
    Case("no-model-no-messages", generate(model="", messages=[]), "model"),
    Case("nan-temperature", generate(params=params(temperature=NAN)), "params.temperature"),
    Case("inf-temperature", generate(params=params(temperature=INF)), "params.temperature"),
    Case("negative-temperature", generate(params=params(temperature=-0.1)), "params.temperature"),
    Case("nan-top-p", generate(params=params(top_p=NAN)), "params.top_p"),
    Case("zero-top-p", generate(params=params(top_p=0.0)), "params.top_p"),
    Case(
        "negative-max-tokens",
        generate(params=params(max_output_tokens=-1)),
        "params.max_output_tokens",
    ),
    Case(
        "huge-max-tokens",
        generate(params=params(max_output_tokens=2**31 - 1)),
        "params.max_output_tokens",
    ),
    Case("unknown-role", with_message(role=unknown(99), content="hi"), "messages[0].role"),
    Case("empty-content", with_message(content=""), "messages[0].content"),
    Case("odd-name", with_message(content="hi", name="a b\n"), "messages[0].name"),
    Case("unknown-priority", generate(priority=unknown(7)), "priority"),
    Case(
        "unknown-cache-mode",
        generate(cache_policy=common_pb2.CachePolicy(mode=unknown(42))),
        "cache_policy.mode",
    ),
    Case(
        "negative-cache-ttl",
        generate(cache_policy=common_pb2.CachePolicy(ttl=duration_pb2.Duration(seconds=-5))),
        "cache_policy.ttl",
    ),
    Case(
        "deep-tool-schema",
        generate(params=params(tools=[common_pb2.Tool(name="t", parameters_json=DEEP_JSON)])),
        "params.tools[0].parameters_json",
    ),
    Case(
        "deep-response-schema",
        generate(
            params=params(
                response_format=common_pb2.ResponseFormat(
                    type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
                    schema_name="s",
                    json_schema=DEEP_JSON,
                )
            )
        ),
        "params.response_format.json_schema",
    ),
    Case(
        "unknown-tool-choice",
        generate(params=params(tool_choice=common_pb2.ToolChoice(mode=unknown(17)))),
        "params.tool_choice.mode",
    ),
    Case(
        "deep-tool-arguments",
        generate(
            messages=[
                user("hi"),
                common_pb2.ChatMessage(
                    role=common_pb2.ROLE_ASSISTANT,
                    tool_calls=[common_pb2.ToolCall(id="c", name="f", arguments_json=DEEP_JSON)],
                ),
            ]
        ),
        "messages[1].tool_calls[0].arguments_json",
    ),
    Case("long-stop", generate(params=params(stop=["x" * 10_000])), "params.stop"),
    Case("huge-tag-key", generate(tags={"k" * 100_000: "v"}), "tags"),
    Case("many-tags", generate(tags={f"k{i}": "v" for i in range(1000)}), "tags"),
    Case("huge-model", generate(model="m" * 1_000_000), "model"),
    Case("control-chars-model", generate(model="mock-fast\n\x00"), "model"),
    Case("odd-request-id", generate(request_id="a b/../\n"), "request_id"),
    Case("long-request-id", generate(request_id="r" * 10_000), "request_id"),
    Case("too-many-messages", generate(messages=[user("hi")] * 1001), "messages"),
    Case(
        "nan-retrieval-score",
        generate(retrieval=orchestrator_pb2.RetrievalSettings(collection="faq", min_score=NAN)),
        "retrieval.min_score",
    ),
    Case(
        "template-nan-variable",
        generate(
            messages=[], template=orchestrator_pb2.TemplateRef(name="t", variables=struct(x=NAN))
        ),
        "template.variables",
    ),
    Case(
        "template-deep-variables",
        generate(
            messages=[], template=orchestrator_pb2.TemplateRef(name="t", variables=deep_struct(25))
        ),
        "template.variables",
    ),
    Case(
        "template-huge-name",
        generate(messages=[], template=orchestrator_pb2.TemplateRef(name="{{" * 100_000)),
        "template.name",
    ),
    Case("negative-cost-ceiling", generate(max_cost_usd_micros=-1), "max_cost_usd_micros"),
]


def assert_refused(err: grpc.RpcError, field: str) -> None:
    error = rich_error(err)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert field in error.field_violations, error
    assert not any(mark in error.message for mark in TRACEBACK_MARKS), error.message


@pytest.mark.parametrize("case", GENERATE_CASES, ids=lambda c: c.id)
async def test_generate_refuses_hostile_requests_and_changes_nothing(
    case: Case, orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    before = state_snapshot(redis_db)
    with pytest.raises(grpc.aio.AioRpcError) as unary:
        await orchestrator.stub.Generate(case.request, metadata=bearer(test_keys.acme), timeout=10)
    streamed = orchestrator_pb2.StreamGenerateRequest.FromString(case.request.SerializeToString())
    with pytest.raises(grpc.aio.AioRpcError) as stream:
        async for _ in orchestrator.stub.StreamGenerate(
            streamed, metadata=bearer(test_keys.acme), timeout=10
        ):
            pass

    assert_refused(unary.value, case.field)
    assert_refused(stream.value, case.field)
    assert state_snapshot(redis_db) == before


async def test_a_job_of_hostile_work_is_never_queued(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(orchestrator.channel)
    cases = [
        (
            jobs_pb2.SubmitJobRequest(
                request_id="job-1", generate=generate(params=params(temperature=NAN))
            ),
            "generate.params.temperature",
        ),
        (
            jobs_pb2.SubmitJobRequest(
                request_id="job-2",
                generate=generate(tags={"k" * 1000: "v"}),
            ),
            "generate.tags",
        ),
        (
            jobs_pb2.SubmitJobRequest(
                request_id="job-3",
                pipeline=pipelines_pb2.RunPipelineRequest(pipeline="p", inputs=struct(x=INF)),
            ),
            "pipeline.inputs",
        ),
    ]
    before = state_snapshot(redis_db)
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jobs.SubmitJob(request, metadata=bearer(test_keys.acme), timeout=10)
        assert_refused(caught.value, field)
    assert state_snapshot(redis_db) == before


async def test_ids_and_names_too_long_to_echo_are_refused_not_echoed(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(orchestrator.channel)
    pipelines = pipelines_pb2_grpc.PipelineServiceStub(orchestrator.channel)
    traces = traces_pb2_grpc.TraceServiceStub(orchestrator.channel)
    key = bearer(test_keys.acme)
    before = state_snapshot(redis_db)
    calls = [
        (jobs.GetJob(jobs_pb2.GetJobRequest(job_id="j" * 1_000_000), metadata=key), "job_id"),
        (
            jobs.CancelJob(
                jobs_pb2.CancelJobRequest(request_id="c-1", job_id="j\n" * 1000), metadata=key
            ),
            "job_id",
        ),
        (
            pipelines.RunPipeline(
                pipelines_pb2.RunPipelineRequest(pipeline="p" * 1_000_000), metadata=key
            ),
            "pipeline",
        ),
        (
            traces.GetTrace(traces_pb2.GetTraceRequest(request_id="t" * 1_000_000), metadata=key),
            "request_id",
        ),
        (
            orchestrator.stub.Embed(orchestrator_pb2.EmbedRequest(inputs=["x"]), metadata=key),
            "model",
        ),
    ]
    for call, field in calls:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert_refused(caught.value, field)
    assert state_snapshot(redis_db) == before


def admit(key: str, **kw: Any) -> control_pb2.AdmitRequest:
    fields: dict[str, Any] = {
        "request_id": "admit-1",
        "api_key": key,
        "model": "mock-small",
        "estimated_input_tokens": 10,
        "max_output_tokens": 10,
        **kw,
    }
    return control_pb2.AdmitRequest(**fields)


def settle(**kw: Any) -> control_pb2.SettleRequest:
    fields: dict[str, Any] = {
        "request_id": "settle-1",
        "tenant_id": "acme",
        "key_id": "acme-main",
        "outcome": control_pb2.OUTCOME_SUCCESS,
        "model": "mock-small",
        **kw,
    }
    return control_pb2.SettleRequest(**fields)


async def test_control_refuses_absurd_admissions_and_settlements(
    control: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    key = test_keys.acme
    cases: list[tuple[str, Any, str]] = [
        ("Admit", admit(key, estimated_input_tokens=10**15), "estimated_input_tokens"),
        ("Admit", admit(key, max_output_tokens=2**62), "max_output_tokens"),
        ("Admit", admit(key, max_output_tokens=-5), "max_output_tokens"),
        ("Admit", admit(key, priority=unknown(9)), "priority"),
        ("Admit", admit(key, model="m" * 100_000), "model"),
        ("Admit", admit(key, candidates=["mock-small"] * 100), "candidates"),
        ("Admit", admit(key, request_id="bad id\n"), "request_id"),
        ("Settle", settle(outcome=unknown(12)), "outcome"),
        ("Settle", settle(cache_status=unknown(99)), "cache_status"),
        ("Settle", settle(cost=common_pb2.Cost(input_usd_micros=-1)), "usage"),
        ("Settle", settle(usage=common_pb2.Usage(input_tokens=2**60)), "usage"),
        ("Settle", settle(tenant_id="Acme:*"), "tenant_id"),
        (
            "Settle",
            settle(attempts=[control_pb2.Attempt(model="mock-small")] * 100),
            "attempts",
        ),
        (
            "Settle",
            settle(
                guardrail_findings=[control_pb2.GuardrailFinding(rule="pii", action=unknown(9))]
            ),
            "guardrail_findings[0]",
        ),
        (
            "SettleBatch",
            control_pb2.SettleBatchRequest(
                entries=[control_pb2.SettleBatchEntry(settlement=settle())] * 1001
            ),
            "entries",
        ),
        (
            "SettleBatch",
            control_pb2.SettleBatchRequest(
                entries=[
                    control_pb2.SettleBatchEntry(settlement=settle()),
                    control_pb2.SettleBatchEntry(
                        settlement=settle(usage=common_pb2.Usage(output_tokens=2**60))
                    ),
                ]
            ),
            "entries[1].settlement.usage",
        ),
        (
            "CheckOutput",
            control_pb2.CheckOutputRequest(request_id="x" * 10_000, tenant_id="acme"),
            "request_id",
        ),
    ]
    before = state_snapshot(redis_db)
    for method, request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(control.stub, method)(request, timeout=10)
        assert_refused(caught.value, field)
    assert state_snapshot(redis_db) == before


def store(**kw: Any) -> cache_pb2.StoreRequest:
    fields: dict[str, Any] = {
        "scope": cache_pb2.CacheScope(tenant_id="acme", model="mock-small"),
        "messages": [user("what is the answer?")],
        "answer": cache_pb2.CachedAnswer(text="42"),
        **kw,
    }
    return cache_pb2.StoreRequest(**fields)


async def test_cache_refuses_hostile_entries_and_stores_nothing(
    cache: Served, redis_db: redis.Redis
) -> None:
    bad_scope = cache_pb2.CacheScope(tenant_id="acme", model="mock-small")
    cases: list[tuple[str, Any, str]] = [
        ("Store", store(ttl=duration_pb2.Duration(seconds=0, nanos=-5)), "ttl"),
        ("Store", store(ttl=duration_pb2.Duration(seconds=1, nanos=-5)), "ttl"),
        (
            "Store",
            store(scope=cache_pb2.CacheScope(tenant_id="acme:*", model="mock-small")),
            "scope.tenant_id",
        ),
        (
            "Store",
            store(scope=cache_pb2.CacheScope(tenant_id="acme", model="m" * 10**6)),
            "scope.model",
        ),
        (
            "Store",
            store(messages=[common_pb2.ChatMessage(role=unknown(77), content="x")]),
            "messages",
        ),
        (
            "Store",
            store(answer=cache_pb2.CachedAnswer(text="42", finish_reason=unknown(55))),
            "answer.finish_reason",
        ),
        (
            "Store",
            store(
                scope=cache_pb2.CacheScope(
                    tenant_id="acme", model="mock-small", params=params(temperature=NAN)
                )
            ),
            "scope.params.temperature",
        ),
        (
            "Lookup",
            cache_pb2.LookupRequest(
                scope=cache_pb2.CacheScope(
                    tenant_id="acme",
                    model="mock-small",
                    semantic=cache_pb2.SemanticPolicy(min_similarity=NAN),
                ),
                messages=[user("q")],
            ),
            "scope.semantic.min_similarity",
        ),
        (
            "StoreBatch",
            cache_pb2.StoreBatchRequest(
                entries=[store(), store(scope=bad_scope, ttl=duration_pb2.Duration(seconds=-1))]
            ),
            "entries[1].ttl",
        ),
    ]
    before = state_snapshot(redis_db)
    for method, request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await getattr(cache.stub, method)(request, timeout=10)
        assert_refused(caught.value, field)
    assert state_snapshot(redis_db) == before


async def test_executor_refuses_hostile_completions(executor: Served) -> None:
    def complete(**kw: Any) -> executor_pb2.CompleteRequest:
        return executor_pb2.CompleteRequest(
            **{"request_id": "e-1", "model": "mock-fast", "messages": [user("hi")], **kw}
        )

    cases = [
        (complete(params=params(temperature=NAN)), "params.temperature"),
        (complete(params=params(top_p=INF)), "params.top_p"),
        (complete(model="m" * 100_000), "model"),
        (
            complete(params=params(tools=[common_pb2.Tool(name="t", parameters_json=DEEP_JSON)])),
            "params.tools[0].parameters_json",
        ),
        (
            complete(messages=[common_pb2.ChatMessage(role=unknown(-3), content="x")]),
            "messages[0].role",
        ),
        (complete(params=params(max_output_tokens=-(2**31))), "params.max_output_tokens"),
    ]
    for request, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as unary:
            await executor.stub.Complete(request, timeout=10)
        assert_refused(unary.value, field)
        streamed = executor_pb2.StreamCompleteRequest.FromString(request.SerializeToString())
        with pytest.raises(grpc.aio.AioRpcError) as stream:
            async for _ in executor.stub.StreamComplete(streamed, timeout=10):
                pass
        assert_refused(stream.value, field)


async def test_invalid_utf8_is_refused_without_a_traceback_and_changes_nothing(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    """Protobuf refuses invalid UTF-8 (and the lone surrogates other clients encode as
    such) before any handler runs; the caller sees a plain error, nothing happens."""
    before = state_snapshot(redis_db)
    for bad in (b"\xed\xa0\x80", b"\xff\xfe\xfd", b"\xc0\xaf\x80"):
        raw = generate(request_id="utf8-1", messages=[user("PLACEHOLDER")]).SerializeToString()
        wire = raw.replace(b"PLACEHOLDER", bad + b"x" * (11 - len(bad)))
        call = orchestrator.channel.unary_unary(
            "/strata.orchestrator.v1.OrchestratorService/Generate"
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(wire, metadata=bearer(test_keys.acme), timeout=10)
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
        assert error.field_violations == ["request"]
        assert "Traceback" not in error.message and 'File "' not in error.message
    assert state_snapshot(redis_db) == before
