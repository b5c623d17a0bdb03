"""gRPC face of the public API: proto in, `Generator`, proto out."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from typing import Any

import grpc

from services.common.calls import Deadline
from services.common.catalog import Catalog
from services.common.errors import ApiKeyInvalid, RequestInvalid, stream_handler, unary_handler
from services.common.validation import check_request_id
from services.orchestrator.clients import HASHED, CacheClient
from services.orchestrator.embed import Embeddings
from services.orchestrator.generation import (
    Answer,
    Event,
    Finished,
    GenerateRequest,
    Generator,
    Started,
    ToolPieces,
)
from services.orchestrator.jobs import JobQueue
from services.orchestrator.knowledge import KnowledgeStore
from services.orchestrator.pipelines import PipelineRunner
from services.orchestrator.records import RecordStore
from services.orchestrator.routes import Router
from strata.orchestrator.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    knowledge_pb2,
    knowledge_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    pipelines_pb2,
    pipelines_pb2_grpc,
    traces_pb2,
    traces_pb2_grpc,
)

_Chunk = orchestrator_pb2.StreamGenerateResponse


def bearer_key(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The API key of `authorization: Bearer <key>`; UNAUTHENTICATED when there is none."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            token = token.strip()
            if scheme.lower() == "bearer" and token and not token.startswith(HASHED):
                return token
    raise ApiKeyInvalid("missing `authorization: Bearer <api key>` metadata")


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Implements strata.orchestrator.v1.OrchestratorService."""

    def __init__(
        self,
        generator: Generator,
        default_deadline_s: float,
        embeddings: Embeddings | None = None,
        catalog: Catalog | None = None,
        router: Router | None = None,
    ) -> None:
        self._generator = generator
        self._default_deadline_s = default_deadline_s
        self._embeddings = embeddings
        self._catalog = catalog
        self._router = router

    @unary_handler
    async def ListModels(
        self,
        request: orchestrator_pb2.ListModelsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> orchestrator_pb2.ListModelsResponse:
        deadline = Deadline.of_call(context, self._default_deadline_s)
        await self._generator.tenant_of(bearer_key(context), deadline)
        reply = orchestrator_pb2.ListModelsResponse()
        if self._catalog is not None:
            for name in sorted(self._catalog.models):
                model = self._catalog.models[name]
                reply.models.add(
                    name=name,
                    kind=model.kind,
                    context_window=model.context_window,
                    max_output_tokens=model.max_output_tokens,
                )
        if self._router is not None:
            for route in self._router.configs():
                reply.routes.add(name=route.name, policy=route.policy, candidates=route.candidates)
        return reply

    @unary_handler
    async def Embed(
        self,
        request: orchestrator_pb2.EmbedRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> orchestrator_pb2.EmbedResponse:
        if self._embeddings is None:
            raise RequestInvalid.field("model", "embeddings are not served here")
        return await self._embeddings.embed(
            request, bearer_key(context), Deadline.of_call(context, self._default_deadline_s)
        )

    def _events(
        self,
        request: GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        *,
        stream: bool,
    ) -> AsyncGenerator[Event, None]:
        return self._generator.generate(
            request,
            bearer_key(context),
            Deadline.of_call(context, self._default_deadline_s),
            stream=stream,
        )

    @unary_handler
    async def Generate(
        self,
        request: orchestrator_pb2.GenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> orchestrator_pb2.GenerateResponse:
        answer = Answer()
        events = self._events(request, context, stream=False)
        async with aclosing(events):
            async for event in events:
                answer.add(event)
        return answer.build()

    @stream_handler
    async def StreamGenerate(
        self,
        request: orchestrator_pb2.StreamGenerateRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[orchestrator_pb2.StreamGenerateResponse, None]:
        events = self._events(request, context, stream=True)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, str):
                    yield _Chunk(delta=_Chunk.Delta(text=event))
                elif isinstance(event, ToolPieces):
                    yield _Chunk(delta=_Chunk.Delta(tool_calls=event.pieces))
                elif isinstance(event, Started):
                    yield _Chunk(
                        start=_Chunk.Start(
                            request_id=event.request_id,
                            model=event.model,
                            cache_status=event.cache_status,
                            cache_match=event.cache_match,
                            prompt=event.prompt,
                        )
                    )
                else:
                    yield _Chunk(final=_final(event))


def _final(event: Finished) -> orchestrator_pb2.StreamGenerateResponse.Final:
    return _Chunk.Final(
        finish_reason=event.finish_reason,
        usage=event.usage,
        cost=event.cost,
        cache_status=event.cache_status,
        citations=event.citations,
        retrieval_degraded=event.retrieval_degraded,
    )


class KnowledgeServicer(knowledge_pb2_grpc.KnowledgeServiceServicer):
    """Implements strata.orchestrator.v1.KnowledgeService."""

    def __init__(
        self,
        knowledge: KnowledgeStore,
        tenants: Generator,
        cache: CacheClient,
        default_deadline_s: float,
    ) -> None:
        self._knowledge = knowledge
        self._tenants = tenants
        self._cache = cache
        self._default_deadline_s = default_deadline_s

    async def _tenant(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        deadline = Deadline.of_call(context, self._default_deadline_s)
        return await self._tenants.tenant_of(bearer_key(context), deadline)

    @stream_handler
    async def UpsertDocuments(
        self,
        request: knowledge_pb2.UpsertDocumentsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[knowledge_pb2.UpsertDocumentsResponse, None]:
        if violation := check_request_id(request.request_id):
            raise RequestInvalid([violation])
        tenant = await self._tenant(context)
        progress = self._knowledge.upsert(tenant, request.collection, request.documents)
        last = None
        async with aclosing(progress):
            async for done, total, chunks in progress:
                last = knowledge_pb2.UpsertDocumentsResponse(done=done, total=total, chunks=chunks)
                if done < total:
                    yield last
        # Answers grounded on an older version of these documents must not be served again.
        await self._cache.forget_documents(tenant, [d.id for d in request.documents])
        if last is not None:
            yield last

    @unary_handler
    async def DeleteDocuments(
        self,
        request: knowledge_pb2.DeleteDocumentsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> knowledge_pb2.DeleteDocumentsResponse:
        if violation := check_request_id(request.request_id):
            raise RequestInvalid([violation])
        tenant = await self._tenant(context)
        deleted = await self._knowledge.delete(tenant, request.collection, request.document_ids)
        await self._cache.forget_documents(tenant, deleted)
        return knowledge_pb2.DeleteDocumentsResponse(deleted=len(deleted))

    @unary_handler
    async def ListDocuments(
        self,
        request: knowledge_pb2.ListDocumentsRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> knowledge_pb2.ListDocumentsResponse:
        tenant = await self._tenant(context)
        documents, token = await self._knowledge.list(
            tenant, request.collection, request.page_size, request.page_token
        )
        response = knowledge_pb2.ListDocumentsResponse(next_page_token=token)
        for document in documents:
            info = response.documents.add(
                id=document.id,
                version=document.version,
                chunks=document.chunks,
                metadata=document.metadata,
            )
            info.update_time.FromNanoseconds(int(document.update_time * 1e9))
        return response

    @unary_handler
    async def Search(
        self, request: knowledge_pb2.SearchRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> knowledge_pb2.SearchResponse:
        tenant = await self._tenant(context)
        # Nanoseconds: ToSeconds() would truncate an age under a second to 0, i.e. no limit.
        max_age = request.max_age.ToNanoseconds() / 1e9 if request.HasField("max_age") else None
        chunks = await self._knowledge.search(
            tenant,
            request.collection,
            request.query,
            top_k=request.top_k or 4,
            min_score=request.min_score,
            max_age_s=max_age or None,
            metadata_filter=dict(request.metadata_filter),
        )
        return knowledge_pb2.SearchResponse(
            hits=[
                knowledge_pb2.SearchHit(
                    document_id=c.document_id,
                    version=c.version,
                    chunk=c.chunk,
                    text=c.text,
                    score=c.score,
                    metadata=c.metadata,
                )
                for c in chunks
            ]
        )


class PipelineServicer(pipelines_pb2_grpc.PipelineServiceServicer):
    """Implements strata.orchestrator.v1.PipelineService."""

    def __init__(
        self, runner: PipelineRunner, tenants: Generator, default_deadline_s: float
    ) -> None:
        self._runner = runner
        self._tenants = tenants
        self._default_deadline_s = default_deadline_s

    def _events(
        self,
        request: pipelines_pb2.RunPipelineRequest | pipelines_pb2.StreamPipelineRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[pipelines_pb2.StepResult | pipelines_pb2.RunPipelineResponse, None]:
        api_key = bearer_key(context)
        deadline = Deadline.of_call(context, self._default_deadline_s)
        return self._runner.run(
            request, api_key, deadline, lambda: self._tenants.tenant_of(api_key, deadline)
        )

    @unary_handler
    async def RunPipeline(
        self,
        request: pipelines_pb2.RunPipelineRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pipelines_pb2.RunPipelineResponse:
        result = pipelines_pb2.RunPipelineResponse()
        events = self._events(request, context)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, pipelines_pb2.RunPipelineResponse):
                    result = event
        return result

    @stream_handler
    async def StreamPipeline(
        self,
        request: pipelines_pb2.StreamPipelineRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncGenerator[pipelines_pb2.StreamPipelineResponse, None]:
        events = self._events(request, context)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, pipelines_pb2.RunPipelineResponse):
                    yield pipelines_pb2.StreamPipelineResponse(result=event)
                else:
                    yield pipelines_pb2.StreamPipelineResponse(step=event)


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    """Implements strata.orchestrator.v1.JobService: jobs run as the key that queued them."""

    def __init__(
        self,
        queue: JobQueue,
        tenants: Generator,
        check_work: Callable[[jobs_pb2.SubmitJobRequest], None],
        default_deadline_s: float,
    ) -> None:
        self._queue = queue
        self._tenants = tenants
        self._check_work = check_work
        self._default_deadline_s = default_deadline_s

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[str, str]:
        api_key = bearer_key(context)
        deadline = Deadline.of_call(context, self._default_deadline_s)
        tenant = await self._tenants.tenant_of(api_key, deadline)
        return tenant, HASHED + hashlib.sha256(api_key.encode()).hexdigest()

    @unary_handler
    async def SubmitJob(
        self, request: jobs_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.SubmitJobResponse:
        tenant, owner = await self._caller(context)
        self._check_work(request)
        return jobs_pb2.SubmitJobResponse(job=await self._queue.submit(tenant, request, owner))

    @unary_handler
    async def GetJob(
        self, request: jobs_pb2.GetJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.GetJobResponse:
        tenant, _ = await self._caller(context)
        return jobs_pb2.GetJobResponse(job=await self._queue.get(tenant, request.job_id))

    @stream_handler
    async def WatchJob(
        self, request: jobs_pb2.WatchJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncGenerator[jobs_pb2.WatchJobResponse, None]:
        tenant, _ = await self._caller(context)
        changes = self._queue.watch(tenant, request.job_id)
        async with aclosing(changes):
            async for job in changes:
                yield jobs_pb2.WatchJobResponse(job=job)

    @unary_handler
    async def CancelJob(
        self, request: jobs_pb2.CancelJobRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.CancelJobResponse:
        if violation := check_request_id(request.request_id):
            raise RequestInvalid([violation])
        tenant, _ = await self._caller(context)
        return jobs_pb2.CancelJobResponse(job=await self._queue.cancel(tenant, request.job_id))

    @unary_handler
    async def ListJobs(
        self, request: jobs_pb2.ListJobsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> jobs_pb2.ListJobsResponse:
        tenant, _ = await self._caller(context)
        jobs, token = await self._queue.list(
            tenant, request.page_size, request.page_token, request.state
        )
        return jobs_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)


class TraceServicer(traces_pb2_grpc.TraceServiceServicer):
    """Implements strata.orchestrator.v1.TraceService: a tenant reads its own records only."""

    def __init__(self, records: RecordStore, tenants: Generator, default_deadline_s: float) -> None:
        self._records = records
        self._tenants = tenants
        self._default_deadline_s = default_deadline_s

    @unary_handler
    async def GetTrace(
        self, request: traces_pb2.GetTraceRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> traces_pb2.GetTraceResponse:
        deadline = Deadline.of_call(context, self._default_deadline_s)
        tenant = await self._tenants.tenant_of(bearer_key(context), deadline)
        record = await self._records.get(tenant, request.request_id)
        return traces_pb2.GetTraceResponse(record=record)
