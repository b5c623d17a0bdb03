"""Orchestrator processes sharing one Redis: a job outlives the worker killed while running it,
and duplicates of one request id spread over two replicas reach the upstream once."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis

from strata.orchestrator.v1 import jobs_pb2, jobs_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.devstack import LocalStack, ServiceProcess
from tests.conftest import ApiKeys
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import bearer, fresh_stack, usage_record, user

CLAIM_IDLE_S = 1.5
API_ONLY = {"STRATA_ORCHESTRATOR_ROLE": "api", "STRATA_ORCHESTRATOR_KNOWLEDGE_ENABLED": "0"}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
) -> Iterator[LocalStack]:
    """The suite with an API-only orchestrator: jobs wait for the workers a test starts."""
    running = fresh_stack(
        tmp_path_factory.mktemp("replicas"),
        redis_url,
        tenants_file,
        models_file,
        API_ONLY,
    )
    try:
        yield running
    finally:
        running.stop()


def orchestrator(stack: LocalStack, name: str, **settings: str) -> ServiceProcess:
    """Another orchestrator process beside the stack's, on the same services and Redis."""
    first = stack.services["orchestrator"]
    base = {
        "CONTROL_ADDRESS": stack.addresses["control"],
        "CACHE_ADDRESS": stack.addresses["cache"],
        "EXECUTOR_ADDRESS": stack.addresses["executor"],
        "MODELS_FILE": first.settings["MODELS_FILE"],
        "REDIS_URL": first.settings["REDIS_URL"],
        "CACHE_ADMIN_TOKEN": first.settings["CACHE_ADMIN_TOKEN"],
        "DATA_DIR": str(stack.run_dir / name),
        "KNOWLEDGE_ENABLED": "0",
        "JOB_CLAIM_IDLE_S": str(CLAIM_IDLE_S),
    }
    return ServiceProcess("orchestrator", stack.run_dir, {**base, **settings}, name=name).start()


def watch_until(
    jobs: jobs_pb2_grpc.JobServiceStub, key: str, job_id: str, states: set[int], timeout_s: float
) -> jobs_pb2.Job:
    deadline = time.monotonic() + timeout_s
    while True:
        job = jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), metadata=bearer(key)).job
        if job.state in states:
            return job
        assert time.monotonic() < deadline, f"job still {jobs_pb2.JobState.Name(job.state)}"
        time.sleep(0.05)


def test_a_job_survives_the_kill_of_the_worker_running_it(
    stack: LocalStack, test_keys: ApiKeys, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    before = usage_record(client, "acme").get("requests", 0)
    channel = grpc.insecure_channel(stack.addresses["orchestrator"])
    jobs = jobs_pb2_grpc.JobServiceStub(channel)
    # mock-slow-chunks sends a word every 200 ms: the job runs for seconds.
    work = orchestrator_pb2.GenerateRequest(
        model="mock-slow-chunks", messages=[user(f"survive {uuid.uuid4().hex}")]
    )
    submitted = jobs.SubmitJob(
        jobs_pb2.SubmitJobRequest(request_id=uuid.uuid4().hex, generate=work),
        metadata=bearer(test_keys.acme),
    ).job
    assert submitted.state == jobs_pb2.JOB_STATE_QUEUED
    time.sleep(0.5)
    # Queued until a worker exists: the stack's orchestrator only serves the API.
    assert watch_until(jobs, test_keys.acme, submitted.job_id, {jobs_pb2.JOB_STATE_QUEUED}, 1)

    doomed = orchestrator(stack, "doomed", ROLE="worker")
    running = watch_until(jobs, test_keys.acme, submitted.job_id, {jobs_pb2.JOB_STATE_RUNNING}, 10)
    assert running.attempts == 1
    time.sleep(0.5)
    assert doomed.process is not None
    doomed.process.kill()  # SIGKILL: no goodbye, the job's entry stays pending
    doomed.process.wait()

    survivor = orchestrator(stack, "survivor", ROLE="worker")
    try:
        done = watch_until(
            jobs,
            test_keys.acme,
            submitted.job_id,
            {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED},
            60,
        )
    finally:
        survivor.stop()
        channel.close()

    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED, done.error
    assert done.attempts == 2
    assert done.generate.request_id == submitted.job_id
    assert done.generate.text.startswith("Mock answer to")
    # Charged once, though two workers ran it.
    assert usage_record(client, "acme").get("requests", 0) == before + 1
    assert client.xlen("strata:jobs") == 0


def test_duplicates_on_two_replicas_reach_the_upstream_once(
    stack: LocalStack, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    second = orchestrator(stack, "second", ROLE="api")
    marker = uuid.uuid4().hex
    request = orchestrator_pb2.GenerateRequest(
        model="up-slow", messages=[user(f"once {marker}")], request_id=uuid.uuid4().hex
    )
    channels = [
        grpc.insecure_channel(stack.addresses["orchestrator"]),
        grpc.insecure_channel(second.address),
    ]
    stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(c) for c in channels]
    try:
        with ThreadPoolExecutor(max_workers=32) as pool:
            replies = list(
                pool.map(
                    lambda i: stubs[i % 2].Generate(
                        request, metadata=bearer(test_keys.acme), timeout=30
                    ),
                    range(100),
                )
            )
    finally:
        for channel in channels:
            channel.close()
        second.stop()

    assert len(upstream.calls(marker)) == 1
    assert {r.text for r in replies} == {replies[0].text}
    assert {r.request_id for r in replies} == {request.request_id}
