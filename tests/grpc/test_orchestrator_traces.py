"""TraceService through real stubs: a tenant reads the records of its own requests only."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.orchestrator.app import TRACE_SERVICE_NAME
from services.orchestrator.records import record_key
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import jobs_pb2, jobs_pb2_grpc, orchestrator_pb2, traces_pb2
from strata.orchestrator.v1.traces_pb2_grpc import TraceServiceStub
from tests.conftest import ApiKeys
from tests.grpc.conftest import Served, StartOrchestrator
from tests.helpers import RichError, bearer, eventually, rich_error, user


def traces(served: Served) -> Any:
    return TraceServiceStub(served.channel)


async def get_trace(served: Served, key: str, request_id: str) -> traces_pb2.RequestRecord:
    reply = await traces(served).GetTrace(
        traces_pb2.GetTraceRequest(request_id=request_id), metadata=bearer(key), timeout=5
    )
    record: traces_pb2.RequestRecord = reply.record
    return record


async def recorded(served: Served, key: str, request_id: str) -> traces_pb2.RequestRecord:
    """The request's record, once written (after the reply, with its settlement)."""

    async def found() -> traces_pb2.RequestRecord | None:
        try:
            return await get_trace(served, key, request_id)
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return None

    record: traces_pb2.RequestRecord = await eventually(found)
    return record


async def trace_error(served: Served, metadata: Any, request_id: str) -> RichError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await traces(served).GetTrace(
            traces_pb2.GetTraceRequest(request_id=request_id), metadata=metadata, timeout=5
        )
    return rich_error(caught.value)


async def generate(
    served: Served, key: str, request_id: str, text: str = "what is a trace?"
) -> orchestrator_pb2.GenerateResponse:
    reply: orchestrator_pb2.GenerateResponse = await served.stub.Generate(
        orchestrator_pb2.GenerateRequest(
            model="mock-fast",
            messages=[user(text)],
            request_id=request_id,
            params=common_pb2.GenerationParams(seed=11),
        ),
        metadata=bearer(key),
        timeout=10,
    )
    return reply


async def test_a_request_reads_back_as_its_record(orchestrator: Served, test_keys: ApiKeys) -> None:
    answer = await generate(orchestrator, test_keys.acme, "traced-1")

    record = await recorded(orchestrator, test_keys.acme, "traced-1")

    assert (record.request_id, record.tenant_id, record.model) == ("traced-1", "acme", answer.model)
    assert record.usage == answer.usage
    assert record.cost == answer.cost
    assert record.finish_reason == answer.finish_reason
    assert record.cache_status == answer.cache_status
    assert record.outcome == "OK"
    assert record.request.params.seed == 11
    assert record.attempts and record.attempts[-1].model == answer.model
    assert record.latency.ToNanoseconds() > 0
    # Content capture is off by default: no output.
    assert record.output == ""
    # Another key of the same tenant reads it too.
    assert (await get_trace(orchestrator, test_keys.acme_second, "traced-1")) == record


async def test_the_output_is_recorded_when_content_capture_is_on(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys
) -> None:
    served = await start_orchestrator(capture_content=True)
    answer = await generate(served, test_keys.acme, "captured-1")

    record = await recorded(served, test_keys.acme, "captured-1")

    assert record.output == answer.text
    assert not record.output_truncated


async def test_another_tenants_record_is_not_found(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    record = traces_pb2.RequestRecord(request_id="acme-only", tenant_id="acme", outcome="OK")
    redis_db.set(record_key("acme", "acme-only"), record.SerializeToString())
    # The record is there for its own tenant...
    assert await get_trace(orchestrator, test_keys.acme, "acme-only") == record

    # ...and invisible to any other.
    error = await trace_error(orchestrator, bearer(test_keys.globex), "acme-only")

    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TRACE_NOT_FOUND")
    assert error.metadata == {"request_id": "acme-only"}


async def test_another_tenants_request_is_not_found(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    await generate(orchestrator, test_keys.acme, "acme-request")
    await recorded(orchestrator, test_keys.acme, "acme-request")

    error = await trace_error(orchestrator, bearer(test_keys.globex), "acme-request")

    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TRACE_NOT_FOUND")


async def test_an_unknown_request_is_not_found(orchestrator: Served, test_keys: ApiKeys) -> None:
    error = await trace_error(orchestrator, bearer(test_keys.acme), "never-sent")

    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TRACE_NOT_FOUND")
    assert error.metadata == {"request_id": "never-sent"}


async def test_a_malformed_request_id_is_refused(orchestrator: Served, test_keys: ApiKeys) -> None:
    for bad in ("", "has spaces", "x" * 129):
        error = await trace_error(orchestrator, bearer(test_keys.acme), bad)

        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
        assert error.field_violations == ["request_id"]


async def test_traces_need_a_valid_key_like_every_service(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    jobs = jobs_pb2_grpc.JobServiceStub(orchestrator.channel)
    for metadata in ((), bearer(test_keys.disabled), bearer("sk-strata-unknown")):
        error = await trace_error(orchestrator, metadata, "any-id")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await jobs.GetJob(jobs_pb2.GetJobRequest(job_id="any-id"), metadata=metadata)
        expected = rich_error(caught.value)

        assert error.code == grpc.StatusCode.UNAUTHENTICATED
        assert (error.code, error.reason) == (expected.code, expected.reason)


async def test_traces_are_served_by_the_api_role_only(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys
) -> None:
    api = await start_orchestrator(role="api")
    error = await trace_error(api, bearer(test_keys.acme), "never-sent")
    assert error.code == grpc.StatusCode.NOT_FOUND
    health = await health_pb2_grpc.HealthStub(api.channel).Check(
        health_pb2.HealthCheckRequest(service=TRACE_SERVICE_NAME), timeout=5
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    worker = await start_orchestrator(role="worker")
    error = await trace_error(worker, bearer(test_keys.acme), "never-sent")
    assert error.code == grpc.StatusCode.UNIMPLEMENTED
