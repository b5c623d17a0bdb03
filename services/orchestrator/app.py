"""Wires the orchestrator: settings → Redis, channels to control, cache and executor, routes,
templates, knowledge → generator, pipelines, job queue and workers → the four services."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
from collections.abc import Awaitable, Callable

import grpc

from services.common.bootstrap import Service, answered_once
from services.common.calls import Deadline, check_serving, open_channel
from services.common.catalog import Catalog, load_catalog
from services.common.embeddings import LocalEmbedder
from services.common.errors import FieldViolation, RequestInvalid
from services.common.guardrails import Guardrails
from services.common.redis_state import connect
from services.common.security import Trust
from services.common.settings import ConfigError
from services.common.tasks import cancel_and_wait
from services.orchestrator.clients import CacheClient, ControlClient, ExecutorClient
from services.orchestrator.embed import Embeddings
from services.orchestrator.generation import Answer, Generator
from services.orchestrator.idempotency import IdempotencyStore, SingleFlight
from services.orchestrator.jobs import JobQueue, Runner, Worker
from services.orchestrator.knowledge import (
    DocumentIndex,
    EdgeDocumentIndex,
    KnowledgeStore,
    QdrantDocumentIndex,
)
from services.orchestrator.pipelines import PipelineRunner, check_run, load_pipelines
from services.orchestrator.preparation import Preparer, check_shape
from services.orchestrator.records import RecordStore
from services.orchestrator.routes import LatencyTracker, Router
from services.orchestrator.servicer import (
    JobServicer,
    KnowledgeServicer,
    OrchestratorServicer,
    PipelineServicer,
    TraceServicer,
)
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.templates import TemplateStore
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

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name
KNOWLEDGE_SERVICE_NAME = knowledge_pb2.DESCRIPTOR.services_by_name["KnowledgeService"].full_name
PIPELINE_SERVICE_NAME = pipelines_pb2.DESCRIPTOR.services_by_name["PipelineService"].full_name
JOB_SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name
TRACE_SERVICE_NAME = traces_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name
WORKER_GRACE_S = 10.0
"""On shutdown, running jobs get this long to finish; the rest are taken over elsewhere."""


async def _knowledge_index(settings: OrchestratorSettings, dimensions: int) -> DocumentIndex:
    if settings.vector_backend == "qdrant":
        if not settings.qdrant_url:
            raise ConfigError("the qdrant vector backend needs QDRANT_URL")
        if settings.qdrant_url == ":memory:":  # qdrant-client's local mode (tests, demos)
            index = QdrantDocumentIndex(dimensions, location=":memory:")
        else:
            index = QdrantDocumentIndex(dimensions, url=settings.qdrant_url)
        await index.start()
        return index
    path = settings.data_dir / "knowledge"
    return await asyncio.to_thread(EdgeDocumentIndex, path, dimensions)


def _work_checker(
    catalog: Catalog, router: Router, pipelines: PipelineRunner
) -> Callable[[jobs_pb2.SubmitJobRequest], None]:
    """Refuses, at submission, work that could only fail: malformed (the checks Generate
    and RunPipeline run first), or naming an unknown model, route or pipeline. Everything
    else is checked when the job runs."""

    def check(request: jobs_pb2.SubmitJobRequest) -> None:
        if request.HasField("generate"):
            work = request.generate
            check_shape(work, "generate.")
            if work.route and work.route not in router.names():
                raise RequestInvalid([FieldViolation("generate.route", "is not a known route")])
            if not work.route and work.model not in catalog.models:
                raise RequestInvalid([FieldViolation("generate.model", "is not a known model")])
        elif request.HasField("pipeline"):
            check_run(request.pipeline, "pipeline.")
            if request.pipeline.pipeline not in pipelines.names():
                raise RequestInvalid(
                    [FieldViolation("pipeline.pipeline", "is not a known pipeline")]
                )

    return check


def _job_runner(generator: Generator, pipelines: PipelineRunner, deadline_s: float) -> Runner:
    """Runs a job as the key that queued it (its hash is the credential)."""

    async def run(tenant: str, owner: str, work: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        deadline = Deadline.after(deadline_s)
        if work.HasField("generate"):
            answer = Answer()
            events = generator.generate(work.generate, owner, deadline, stream=False)
            async with contextlib.aclosing(events):
                async for event in events:
                    answer.add(event)
            return jobs_pb2.Job(generate=answer.build())
        result = pipelines_pb2.RunPipelineResponse()
        steps = pipelines.run(
            work.pipeline, owner, deadline, lambda: generator.tenant_of(owner, deadline)
        )
        async with contextlib.aclosing(steps):
            async for step in steps:
                if isinstance(step, pipelines_pb2.RunPipelineResponse):
                    result = step
        return jobs_pb2.Job(pipeline=result)

    return run


async def build(settings: OrchestratorSettings) -> Service:
    """The orchestrator, ready for `bootstrap.start`."""
    catalog = load_catalog(settings.models_file)
    client = connect(settings.redis_url, settings.redis_timeout_s)
    trust = Trust.of(settings)
    channels = {
        "control": open_channel(settings.control_address, settings.max_message_bytes, trust),
        "cache": open_channel(settings.cache_address, settings.max_message_bytes, trust),
        "executor": open_channel(settings.executor_address, settings.max_message_bytes, trust),
    }
    admin_token = settings.cache_admin_token
    cache = CacheClient(
        channels["cache"],
        settings.cache_timeout_s,
        admin_token.get_secret_value() if admin_token else None,
        linger_s=settings.after_reply_linger_s,
    )
    latencies = LatencyTracker()
    router = Router(settings.routes_file, catalog, latencies)
    templates = TemplateStore(settings.templates_dir, client)
    knowledge = None
    embedder = None
    if settings.knowledge_enabled:
        # Loading and verifying the model takes a moment: keep the event loop free meanwhile.
        embedder = await asyncio.to_thread(LocalEmbedder)
        index = await _knowledge_index(settings, embedder.dimensions)
        knowledge = KnowledgeStore(
            index,
            embedder,
            client,
            chunk_tokens=settings.knowledge_chunk_tokens,
            overlap_tokens=settings.knowledge_overlap_tokens,
        )
    records = RecordStore(
        client, settings.trace_record_ttl_s, linger_s=settings.after_reply_linger_s
    )
    control = ControlClient(
        channels["control"],
        settings.admit_timeout_s,
        settings.settle_timeout_s,
        linger_s=settings.after_reply_linger_s,
    )
    executor = ExecutorClient(channels["executor"])
    embeddings = Embeddings(catalog, control, executor)
    generator = Generator(
        catalog,
        Guardrails.from_file(settings.guardrails_file),
        control,
        cache,
        executor,
        Preparer(catalog, router, templates, knowledge, settings.retrieval_timeout_s),
        IdempotencyStore(client),
        SingleFlight(client),
        latencies,
        audit_rate=settings.cache_audit_rate,
        records=records,
    )
    pipelines = PipelineRunner(
        load_pipelines(settings.pipelines_file) if settings.pipelines_file else {},
        generator,
        knowledge,
    )
    queue = JobQueue(
        client, result_ttl_s=settings.job_result_ttl_s, claim_idle_s=settings.job_claim_idle_s
    )
    servicers = {
        SERVICE_NAME: OrchestratorServicer(
            generator, settings.default_deadline_s, embeddings, catalog, router
        ),
        PIPELINE_SERVICE_NAME: PipelineServicer(pipelines, generator, settings.default_deadline_s),
        JOB_SERVICE_NAME: JobServicer(
            queue,
            generator,
            _work_checker(catalog, router, pipelines),
            settings.default_deadline_s,
        ),
        TRACE_SERVICE_NAME: TraceServicer(records, generator, settings.default_deadline_s),
    }
    if settings.role == "worker":
        servicers.clear()
    elif knowledge is not None:
        servicers[KNOWLEDGE_SERVICE_NAME] = KnowledgeServicer(
            knowledge, generator, cache, settings.default_deadline_s
        )

    tasks = [asyncio.create_task(router.watch(), name="routes watcher")]
    worker = None
    if settings.role != "api":
        await queue.ensure_group()
        worker = Worker(
            queue,
            _job_runner(generator, pipelines, settings.default_deadline_s),
            name=f"{socket.gethostname()}-{os.getpid()}",
            concurrency=settings.job_concurrency,
            heartbeat_s=min(5.0, settings.job_claim_idle_s / 4),
        )
        tasks.append(asyncio.create_task(worker.run(), name="job worker"))

    def register(server: grpc.aio.Server) -> None:
        adders = {
            SERVICE_NAME: orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server,
            KNOWLEDGE_SERVICE_NAME: knowledge_pb2_grpc.add_KnowledgeServiceServicer_to_server,
            PIPELINE_SERVICE_NAME: pipelines_pb2_grpc.add_PipelineServiceServicer_to_server,
            JOB_SERVICE_NAME: jobs_pb2_grpc.add_JobServiceServicer_to_server,
            TRACE_SERVICE_NAME: traces_pb2_grpc.add_TraceServiceServicer_to_server,
        }
        for name, servicer in servicers.items():
            adders[name](servicer, server)

    async def close() -> None:
        if worker is not None:
            await worker.stop(WORKER_GRACE_S)
        for task in tasks:
            await cancel_and_wait(task)
        await generator.aclose()
        await embeddings.aclose()
        await control.aclose()  # after the settlements above: it sends those it kept
        if knowledge is not None:
            await knowledge.aclose()
        if embedder is not None:
            await embedder.aclose()
        for channel in channels.values():
            await channel.close()
        await client.aclose()

    async def ping_redis() -> None:
        await client.ping()

    probes: dict[str, Callable[[], Awaitable[object]]] = {
        name: functools.partial(check_serving, ch) for name, ch in channels.items()
    }
    # A later Redis outage keeps the orchestrator in rotation: generation goes on without
    # the cache (requests with a request_id or a job need Redis and fail as unavailable).
    probes["redis"] = answered_once(ping_redis)
    return Service(
        name="orchestrator",
        register=register,
        service_names=list(servicers),
        probes=probes,
        close=close,
    )
