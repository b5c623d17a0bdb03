"""Tenant isolation, in one sweep over every tenant-scoped resource, and key revocation.

Globex asks for what Acme owns: jobs (Get, Watch, Cancel), documents (List, Search, Delete,
and an Upsert into a collection of the same name), cached answers, request records (GetTrace)
and idempotency keys. Every answer is what a resource that does not exist gets: NOT_FOUND
with the usual reason (never PERMISSION_DENIED, so ids do not leak), an empty list, a fresh
answer. A revoked key stops working within seconds on every orchestrator replica.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pytest

from strata.common.v1 import common_pb2
from strata.control.v1 import admin_pb2, admin_pb2_grpc
from strata.orchestrator.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    orchestrator_pb2,
    traces_pb2,
    traces_pb2_grpc,
)
from tests.conftest import ApiKeys
from tests.grpc import conftest as grpc_fixtures
from tests.grpc.conftest import ADMIN_TOKEN, Served, StartOrchestrator
from tests.helpers import bearer, eventually, rich_error, user

# The in-process services of tests/grpc (start_orchestrator needs the other three).
cache = grpc_fixtures.cache
control = grpc_fixtures.control
executor = grpc_fixtures.executor
start_orchestrator = grpc_fixtures.start_orchestrator

REVOCATION_S = 13.0
"""How soon a revoked key must be refused everywhere: the orchestrator remembers a key's
tenant for TENANT_MEMO_S (10 s), control checks it on every admission."""


async def not_found(call: Any) -> str:
    """The reason of a NOT_FOUND the call must fail with."""
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        result = call()
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
        else:
            await result
    error = rich_error(failed.value)
    assert error.code == grpc.StatusCode.NOT_FOUND, error
    return error.reason


async def test_one_tenant_sees_nothing_of_another(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys
) -> None:
    served = await start_orchestrator()
    channel = served.channel
    api, jobs = served.stub, jobs_pb2_grpc.JobServiceStub(channel)
    knowledge = knowledge_pb2_grpc.KnowledgeServiceStub(channel)
    traces = traces_pb2_grpc.TraceServiceStub(channel)
    acme, globex = bearer(test_keys.acme), bearer(test_keys.globex)
    unknown = uuid.uuid4().hex

    # Jobs: Get, Watch and Cancel of Acme's job answer Globex as for an unknown id.
    job = (
        await jobs.SubmitJob(
            jobs_pb2.SubmitJobRequest(
                request_id=uuid.uuid4().hex,
                generate=orchestrator_pb2.GenerateRequest(
                    model="mock-fast", messages=[user("a job of acme")]
                ),
            ),
            metadata=acme,
        )
    ).job
    for job_id in (job.job_id, unknown):
        reasons = {
            await not_found(
                lambda i=job_id: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=i), metadata=globex)
            ),
            await not_found(
                lambda i=job_id: jobs.WatchJob(
                    jobs_pb2.WatchJobRequest(job_id=i), metadata=globex, timeout=5
                )
            ),
            await not_found(
                lambda i=job_id: jobs.CancelJob(
                    jobs_pb2.CancelJobRequest(request_id=uuid.uuid4().hex, job_id=i),
                    metadata=globex,
                )
            ),
        }
        assert reasons == {"JOB_NOT_FOUND"}
    listed = await jobs.ListJobs(jobs_pb2.ListJobsRequest(), metadata=globex)
    assert job.job_id not in {j.job_id for j in listed.jobs}
    mine = await jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=acme)
    assert mine.job.state != jobs_pb2.JOB_STATE_CANCELLED  # Globex's cancel changed nothing

    # Documents: a collection name is per tenant.
    document = knowledge_pb2.Document(
        id="plan", version="1", text="Acme's secret plan is to sell anvils to coyotes."
    )
    async for _ in knowledge.UpsertDocuments(
        knowledge_pb2.UpsertDocumentsRequest(
            request_id=uuid.uuid4().hex, collection="plans", documents=[document]
        ),
        metadata=acme,
    ):
        pass
    seen = await knowledge.ListDocuments(
        knowledge_pb2.ListDocumentsRequest(collection="plans"), metadata=globex
    )
    assert not seen.documents
    hits = await knowledge.Search(
        knowledge_pb2.SearchRequest(collection="plans", query="anvils for coyotes"),
        metadata=globex,
    )
    assert not hits.hits
    deleted = await knowledge.DeleteDocuments(
        knowledge_pb2.DeleteDocumentsRequest(
            request_id=uuid.uuid4().hex, collection="plans", document_ids=["plan"]
        ),
        metadata=globex,
    )
    assert deleted.deleted == 0
    decoy = knowledge_pb2.Document(id="plan", version="9", text="Globex owns nothing here.")
    async for _ in knowledge.UpsertDocuments(
        knowledge_pb2.UpsertDocumentsRequest(
            request_id=uuid.uuid4().hex, collection="plans", documents=[decoy]
        ),
        metadata=globex,
    ):
        pass
    kept = await knowledge.ListDocuments(
        knowledge_pb2.ListDocumentsRequest(collection="plans"), metadata=acme
    )
    assert [(d.id, d.version) for d in kept.documents] == [("plan", "1")]
    found = await knowledge.Search(
        knowledge_pb2.SearchRequest(collection="plans", query="anvils for coyotes"),
        metadata=acme,
    )
    assert {h.document_id for h in found.hits} == {"plan"}
    assert all("Globex" not in h.text for h in found.hits)

    # Cached answers: Acme's answer never reaches Globex, however identical the request.
    prompt = orchestrator_pb2.GenerateRequest(
        model="mock-fast",
        messages=[user("What is our discount for anvils?")],
        params=common_pb2.GenerationParams(temperature=0),
    )
    first = await api.Generate(prompt, metadata=acme)
    again = await api.Generate(prompt, metadata=acme)
    assert again.cache_status == common_pb2.CACHE_STATUS_HIT
    other = await api.Generate(prompt, metadata=globex)
    assert other.cache_status == common_pb2.CACHE_STATUS_MISS

    # Request records: Acme's trace (written after the reply) is not Globex's to read.
    async def readable() -> bool:
        try:
            await traces.GetTrace(
                traces_pb2.GetTraceRequest(request_id=first.request_id), metadata=acme
            )
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.NOT_FOUND:
                raise
            return False
        return True

    await eventually(readable)
    for request_id in (first.request_id, unknown):
        assert (
            await not_found(
                lambda i=request_id: traces.GetTrace(
                    traces_pb2.GetTraceRequest(request_id=i), metadata=globex
                )
            )
            == "TRACE_NOT_FOUND"
        )

    # Idempotency keys: one request id in two tenants is two requests.
    shared = uuid.uuid4().hex
    for_acme = await api.Generate(
        orchestrator_pb2.GenerateRequest(
            model="mock-fast", messages=[user("acme asks")], request_id=shared
        ),
        metadata=acme,
    )
    for_globex = await api.Generate(
        orchestrator_pb2.GenerateRequest(
            model="mock-fast", messages=[user("globex asks something else")], request_id=shared
        ),
        metadata=globex,
    )
    assert for_acme.request_id == for_globex.request_id == shared
    assert for_acme.text != for_globex.text
    assert "globex" in for_globex.text.lower()


async def refused_at(call: Any, deadline: float) -> float:
    """Polls the call until it is refused as UNAUTHENTICATED; returns when."""
    while True:
        try:
            await call()
        except grpc.aio.AioRpcError as err:
            if err.code() == grpc.StatusCode.UNAUTHENTICATED:
                return time.monotonic()
            raise
        assert time.monotonic() < deadline, "the revoked key still works"
        await asyncio.sleep(0.2)


async def test_a_revoked_key_stops_working_on_every_replica_within_seconds(
    start_orchestrator: StartOrchestrator, control: Served
) -> None:
    replicas = [await start_orchestrator(), await start_orchestrator()]
    admin = admin_pb2_grpc.ControlAdminServiceStub(control.channel)
    auth = bearer(ADMIN_TOKEN)
    created = await admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            request_id=uuid.uuid4().hex, tenant_id="acme", key_id="short-lived"
        ),
        metadata=auth,
    )
    key = bearer(created.api_key)
    ask = orchestrator_pb2.GenerateRequest(model="mock-fast", messages=[user("still there?")])
    calls = []
    for served in replicas:
        jobs = jobs_pb2_grpc.JobServiceStub(served.channel)
        # Both paths: admission (Generate) and the orchestrator's memo of the key (ListJobs).
        calls += [
            lambda s=served: s.stub.Generate(ask, metadata=key),
            lambda j=jobs: j.ListJobs(jobs_pb2.ListJobsRequest(), metadata=key),
        ]
    for call in calls:
        await call()  # works, and each replica now remembers the key
    await admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(
            request_id=uuid.uuid4().hex, tenant_id="acme", key_id="short-lived"
        ),
        metadata=auth,
    )
    revoked_at = time.monotonic()
    deadline = revoked_at + REVOCATION_S
    refused = await asyncio.gather(*(refused_at(call, deadline) for call in calls))
    assert max(refused) - revoked_at < REVOCATION_S
