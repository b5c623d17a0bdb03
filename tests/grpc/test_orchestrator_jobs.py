"""JobService through real stubs: queued, watched, cancelled, listed, taken over, charged once."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml

from services.orchestrator import app as orchestrator_app
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import jobs_pb2, jobs_pb2_grpc, orchestrator_pb2, pipelines_pb2
from tests.conftest import ApiKeys
from tests.grpc.conftest import Served, StartOrchestrator
from tests.helpers import bearer, rich_error, state_snapshot, usage_record, user

QUEUED, RUNNING = jobs_pb2.JOB_STATE_QUEUED, jobs_pb2.JOB_STATE_RUNNING
SUCCEEDED, CANCELLED = jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_CANCELLED
RESERVATIONS = "strata:{t:acme}:reservations"


def jobs(served: Served) -> Any:
    return jobs_pb2_grpc.JobServiceStub(served.channel)


def generate(
    text: str, model: str = "mock-fast", **params: Any
) -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        model=model, messages=[user(text)], params=common_pb2.GenerationParams(**params)
    )


async def submit(served: Served, key: str, request_id: str, **work: Any) -> jobs_pb2.Job:
    reply = await jobs(served).SubmitJob(
        jobs_pb2.SubmitJobRequest(request_id=request_id, **work), metadata=bearer(key), timeout=5
    )
    job: jobs_pb2.Job = reply.job
    return job


async def get(served: Served, key: str, job_id: str) -> jobs_pb2.Job:
    reply = await jobs(served).GetJob(
        jobs_pb2.GetJobRequest(job_id=job_id), metadata=bearer(key), timeout=5
    )
    job: jobs_pb2.Job = reply.job
    return job


async def watch_until(
    served: Served, key: str, job_id: str, state: int, timeout: float = 15
) -> list[jobs_pb2.Job]:
    """The watched states of the job up to and including the first in `state`."""
    seen: list[jobs_pb2.Job] = []
    call = jobs(served).WatchJob(
        jobs_pb2.WatchJobRequest(job_id=job_id), metadata=bearer(key), timeout=timeout
    )
    async for reply in call:
        seen.append(reply.job)
        if reply.job.state == state:
            call.cancel()
            break
    return seen


async def wait_for(condition: Any, timeout: float = 5) -> None:
    """Polls (bounded) until `condition()` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)


async def test_an_api_orchestrator_queues_and_a_worker_runs_the_job(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    api = await start_orchestrator(role="api")
    job = await submit(api, test_keys.acme, "report-1", generate=generate("summarise the report"))
    assert job.state == QUEUED and len(job.job_id) == 32 and job.attempts == 0

    call = jobs(api).WatchJob(
        jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=bearer(test_keys.acme), timeout=15
    )
    states = [(await call.read()).job]
    assert states[0].state == QUEUED
    # The API role queued the job on the stream but never joined the workers' group.
    assert redis_db.xlen("strata:jobs") == 1
    assert redis_db.xinfo_groups("strata:jobs") == []

    worker = await start_orchestrator(role="worker")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get(worker, test_keys.acme, job.job_id)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    while (reply := await call.read()) != grpc.aio.EOF:
        states.append(reply.job)
    assert [s.state for s in states] == [QUEUED, RUNNING, SUCCEEDED]
    done = states[-1]
    assert done.attempts == 1 and done.WhichOneof("result") == "generate"
    answer = done.generate
    assert answer.text.startswith("Mock answer to “summarise the report”")
    assert answer.request_id == job.job_id and answer.model == "mock-fast"
    assert not done.HasField("error")
    assert await get(api, test_keys.acme, job.job_id) == done
    # Watching a finished job gives its end at once.
    assert await watch_until(api, test_keys.acme, job.job_id, SUCCEEDED) == [done]

    usage = usage_record(redis_db)
    assert (usage["requests"], usage["outcome_success"]) == (1, 1)
    assert usage["spent"] == answer.cost.total_usd_micros > 0
    assert usage["output_tokens"] == answer.usage.output_tokens
    assert redis_db.xlen("strata:jobs") == 0  # acknowledged and deleted


PIPELINES = {
    "pipelines": {
        "tagger": {
            "inputs": [{"name": "text"}],
            "steps": [
                {
                    "name": "draft",
                    "kind": "generate",
                    "model": "mock-fast",
                    "messages": [{"role": "user", "content": "tag: {{ inputs.text }}"}],
                },
                {"name": "tag", "kind": "extract", "from": "draft", "regex": "(urgent|later)"},
            ],
            "outputs": {"tag": "{{ steps.tag.output }}"},
        }
    }
}


async def test_a_pipeline_job_runs_the_pipeline_under_the_job_id(
    start_orchestrator: StartOrchestrator,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    tmp_path: Path,
) -> None:
    pipelines_file = tmp_path / "pipelines.yaml"
    pipelines_file.write_text(yaml.safe_dump(PIPELINES))
    served = await start_orchestrator(pipelines_file=pipelines_file)
    run = pipelines_pb2.RunPipelineRequest(pipeline="tagger")
    run.inputs.update({"text": "server down, urgent"})
    job = await submit(served, test_keys.acme, "tag-1", pipeline=run)
    done = (await watch_until(served, test_keys.acme, job.job_id, SUCCEEDED))[-1]
    result = done.pipeline
    assert result.request_id == job.job_id
    assert dict(result.outputs) == {"tag": "urgent"}
    assert [s.step for s in result.steps] == ["draft", "tag"]
    assert result.cost.total_usd_micros == result.steps[0].cost.total_usd_micros > 0
    usage = usage_record(redis_db)
    assert (usage["requests"], usage["spent"]) == (1, result.cost.total_usd_micros)
    # The step was settled as `<job id>.<step>`.
    assert redis_db.exists(f"strata:{{t:acme}}:settled:{job.job_id}.draft")


async def test_submit_is_idempotent_by_request_id_within_a_tenant(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys
) -> None:
    api = await start_orchestrator(role="api")
    work = generate("the same work")
    first = await submit(api, test_keys.acme, "once", generate=work)
    again = await submit(api, test_keys.acme_second, "once", generate=work)
    assert again == first

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(api, test_keys.acme, "once", generate=generate("other work"))
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION,
        "IDEMPOTENCY_KEY_REUSED",
    )
    assert error.metadata == {"request_id": "once"}

    theirs = await submit(api, test_keys.globex, "once", generate=work)
    assert theirs.job_id != first.job_id
    listed = await jobs(api).ListJobs(jobs_pb2.ListJobsRequest(), metadata=bearer(test_keys.acme))
    assert [j.job_id for j in listed.jobs] == [first.job_id]


async def test_cancelling_a_running_job_stops_it(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    job = await submit(
        orchestrator, test_keys.acme, "hang-1", generate=generate("wait", "mock-hang")
    )
    call = jobs(orchestrator).WatchJob(
        jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=bearer(test_keys.acme), timeout=15
    )
    states = []
    async for reply in call:
        states.append(reply.job.state)
        if reply.job.state == RUNNING:
            break
    # Running: admitted by control and waiting on the model.
    await wait_for(lambda: redis_db.hexists(RESERVATIONS, job.job_id))
    cancelled = await jobs(orchestrator).CancelJob(
        jobs_pb2.CancelJobRequest(request_id="cancel-1", job_id=job.job_id),
        metadata=bearer(test_keys.acme),
    )
    assert cancelled.job.state == CANCELLED and cancelled.job.WhichOneof("result") is None
    async for reply in call:
        states.append(reply.job.state)
    assert states[-2:] == [RUNNING, CANCELLED]
    # The worker stopped the call: it was settled as cancelled and its reservation freed.
    await wait_for(lambda: usage_record(redis_db).get("outcome_cancelled") == 1)
    assert not redis_db.hexists(RESERVATIONS, job.job_id)
    await wait_for(lambda: redis_db.xlen("strata:jobs") == 0)
    assert (await get(orchestrator, test_keys.acme, job.job_id)).state == CANCELLED
    again = await jobs(orchestrator).CancelJob(
        jobs_pb2.CancelJobRequest(request_id="cancel-2", job_id=job.job_id),
        metadata=bearer(test_keys.acme),
    )
    assert again.job == cancelled.job


async def test_jobs_list_in_pages_newest_first_per_tenant(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys
) -> None:
    api = await start_orchestrator(role="api")
    mine = [
        (await submit(api, test_keys.acme, f"mine-{i}", generate=generate(f"job {i}"))).job_id
        for i in range(5)
    ]
    theirs = [
        (await submit(api, test_keys.globex, f"theirs-{i}", generate=generate(f"x {i}"))).job_id
        for i in range(2)
    ]
    await jobs(api).CancelJob(
        jobs_pb2.CancelJobRequest(request_id="c", job_id=mine[1]), metadata=bearer(test_keys.acme)
    )

    pages: list[list[str]] = []
    token = ""
    while True:
        page = await jobs(api).ListJobs(
            jobs_pb2.ListJobsRequest(page_size=2, page_token=token),
            metadata=bearer(test_keys.acme),
        )
        pages.append([j.job_id for j in page.jobs])
        token = page.next_page_token
        if not token:
            break
    assert pages == [mine[4:2:-1], mine[2:0:-1], mine[:1]]

    other = await jobs(api).ListJobs(jobs_pb2.ListJobsRequest(), metadata=bearer(test_keys.globex))
    assert [j.job_id for j in other.jobs] == theirs[::-1]
    only = await jobs(api).ListJobs(
        jobs_pb2.ListJobsRequest(state=CANCELLED), metadata=bearer(test_keys.acme)
    )
    assert [j.job_id for j in only.jobs] == [mine[1]] and only.next_page_token == ""


async def test_another_tenants_job_is_not_found(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys
) -> None:
    api = await start_orchestrator(role="api")
    job = await submit(api, test_keys.acme, "private", generate=generate("private work"))
    stub, who = jobs(api), bearer(test_keys.globex)
    calls = {
        "get": stub.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=who),
        "cancel": stub.CancelJob(
            jobs_pb2.CancelJobRequest(request_id="steal", job_id=job.job_id), metadata=who
        ),
        "watch": stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job.job_id), metadata=who).read(),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "JOB_NOT_FOUND"), name
    # Untouched, and readable by any key of its own tenant.
    assert (await get(api, test_keys.acme_second, job.job_id)).state == QUEUED


@pytest.mark.parametrize(
    ("work", "fields"),
    [
        ({"generate": generate("hi", "no-such-model")}, ["generate.model"]),
        (
            {"generate": orchestrator_pb2.GenerateRequest(route="nope", messages=[user("x")])},
            ["generate.route"],
        ),
        ({"pipeline": pipelines_pb2.RunPipelineRequest(pipeline="nope")}, ["pipeline.pipeline"]),
        ({}, ["work"]),
    ],
    ids=["unknown-model", "unknown-route", "unknown-pipeline", "no-work"],
)
async def test_work_that_could_only_fail_is_refused_at_submission(
    start_orchestrator: StartOrchestrator,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    work: dict[str, Any],
    fields: list[str],
) -> None:
    api = await start_orchestrator(role="api")
    await get_tenant_cached(api, test_keys.acme)
    before = state_snapshot(redis_db)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await submit(api, test_keys.acme, "refused", **work)
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == fields
    assert state_snapshot(redis_db) == before


async def get_tenant_cached(served: Served, key: str) -> None:
    """Any call as the key, so that control's bookkeeping of it is done before a snapshot."""
    listed = await jobs(served).ListJobs(jobs_pb2.ListJobsRequest(), metadata=bearer(key))
    assert list(listed.jobs) == []


async def slow_job_running(served: Served, key: str, redis_db: redis.Redis) -> jobs_pb2.Job:
    """A job of about 1.5 s of output (long enough to be cut, short enough to run twice),
    running on `served` and admitted by control."""
    work = generate("write a slow answer", "mock-slow-chunks", max_output_tokens=8)
    job = await submit(served, key, "slow-1", generate=work)
    await watch_until(served, key, job.job_id, RUNNING)
    await wait_for(lambda: redis_db.hexists(RESERVATIONS, job.job_id))
    return job


async def test_a_job_whose_worker_dies_is_taken_over_and_finishes_once(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    first = await start_orchestrator(job_claim_idle_s=1.0)
    [dying] = [t for t in asyncio.all_tasks() if t.get_name() == "job worker"]
    job = await slow_job_running(first, test_keys.acme, redis_db)

    # The worker dies mid-answer: its entry stays pending and nobody refreshes it.
    dying.cancel()
    await asyncio.wait({dying})
    second = await start_orchestrator(job_claim_idle_s=1.0)
    states = await watch_until(second, test_keys.acme, job.job_id, SUCCEEDED)
    assert [s.state for s in states[:-1]] == [RUNNING] * (len(states) - 1)
    done = states[-1]
    assert done.attempts == 2
    assert done.generate.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert done.generate.usage.output_tokens == 8
    assert await get(first, test_keys.acme, job.job_id) == done
    await wait_for(lambda: redis_db.xlen("strata:jobs") == 0)
    # One settlement for the job id, however often it ran.
    assert usage_record(redis_db)["requests"] == 1


async def test_a_job_handed_back_at_shutdown_is_charged_for_the_answer_it_delivered(
    start_orchestrator: StartOrchestrator,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(orchestrator_app, "WORKER_GRACE_S", 0.0)
    first = await start_orchestrator(job_claim_idle_s=1.0)
    job = await slow_job_running(first, test_keys.acme, redis_db)
    second = await start_orchestrator(job_claim_idle_s=1.0)
    # Shut down with no grace left: the running job is cut and handed back at once.
    await first.server.stop(0)
    done = (await watch_until(second, test_keys.acme, job.job_id, SUCCEEDED))[-1]
    assert done.attempts == 2
    # The cut run left its admission to the run that finished: one charge, for the answer
    # delivered, and nothing stays reserved to expire into a worst-case charge.
    usage = usage_record(redis_db)
    assert (usage["requests"], usage["outcome_success"]) == (1, 1)
    assert "outcome_cancelled" not in usage
    assert usage["output_tokens"] == done.generate.usage.output_tokens == 8
    await wait_for(lambda: not redis_db.hexists(RESERVATIONS, job.job_id))
    assert redis_db.zcard("strata:{t:acme}:pending") == 0
