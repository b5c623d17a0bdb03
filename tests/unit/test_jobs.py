"""The job queue and its workers against a real Redis (no gRPC).

The runner answers by model name: `ok`, `sleep:<s>`, `hang` (until cancelled), `hang-once`
(hangs on a job's first run only), `down` (raises PROVIDER_UNAVAILABLE), `boom` (raises a
bug), `error-result` (returns an error without raising).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from services.common.errors import ProviderUnavailable, RequestInvalid
from services.orchestrator.idempotency import IdempotencyKeyReused
from services.orchestrator.jobs import JobNotFound, JobQueue, Worker
from strata.orchestrator.v1 import jobs_pb2, orchestrator_pb2, pipelines_pb2

STREAM, GROUP = "strata:jobs", "workers"
TTL_S = 60


class FakeRunner:
    """Records what it ran and what was cancelled."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []
        self.owners: list[str] = []
        self.started: asyncio.Queue[str] = asyncio.Queue()
        self.cancelled: asyncio.Queue[str] = asyncio.Queue()

    async def __call__(
        self, tenant: str, owner: str, request: jobs_pb2.SubmitJobRequest
    ) -> jobs_pb2.Job:
        model, job_id = request.generate.model, request.generate.request_id
        self.calls.append((tenant, job_id))
        self.owners.append(owner)
        self.started.put_nowait(job_id)
        first_run = self.calls.count((tenant, job_id)) == 1
        try:
            if model == "hang" or (model == "hang-once" and first_run):
                await asyncio.Event().wait()
            if model.startswith("sleep:"):
                await asyncio.sleep(float(model.removeprefix("sleep:")))
        except asyncio.CancelledError:
            self.cancelled.put_nowait(job_id)
            raise
        if model == "down":
            raise ProviderUnavailable("the provider is down")
        if model == "boom":
            raise RuntimeError("a bug")
        if model == "error-result":
            error = jobs_pb2.JobError(code="INVALID_ARGUMENT", reason="X", message="bad")
            return jobs_pb2.Job(error=error)
        answer = orchestrator_pb2.GenerateResponse(
            request_id=job_id, model=model, text=f"answer for {tenant}"
        )
        return jobs_pb2.Job(generate=answer)


def work(request_id: str, model: str = "ok") -> jobs_pb2.SubmitJobRequest:
    generate = orchestrator_pb2.GenerateRequest(model=model, request_id="client-chosen")
    return jobs_pb2.SubmitJobRequest(request_id=request_id, generate=generate)


@pytest.fixture
async def client(redis_url: str, redis_db: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    made = aioredis.Redis.from_url(redis_url)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
def queue(client: aioredis.Redis) -> JobQueue:
    return JobQueue(client, result_ttl_s=TTL_S, claim_idle_s=0.5)


@pytest.fixture
def runner() -> FakeRunner:
    return FakeRunner()


@contextlib.asynccontextmanager
async def working(
    queue: JobQueue, runner: FakeRunner, name: str = "w1", **options: int
) -> AsyncIterator[Worker]:
    worker = Worker(queue, runner, name=name, heartbeat_s=0.1, **options)
    task = asyncio.create_task(worker.run())
    try:
        yield worker
    finally:
        await worker.stop(1.0)
        await task


@contextlib.asynccontextmanager
async def killed_after_start(queue: JobQueue, runner: FakeRunner, name: str) -> AsyncIterator[None]:
    """A worker that takes one job, then dies without acknowledging it."""
    task = asyncio.create_task(Worker(queue, runner, name=name, heartbeat_s=0.1).run())
    try:
        async with asyncio.timeout(5):
            await runner.started.get()
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def ended(queue: JobQueue, tenant: str, job_id: str) -> jobs_pb2.Job:
    """The job once terminal (read through watch)."""
    async with asyncio.timeout(5), contextlib.aclosing(queue.watch(tenant, job_id)) as changes:
        async for job in changes:
            last = job
    return last


async def pending(client: aioredis.Redis) -> int:
    info = await client.xpending(STREAM, GROUP)
    return int(info["pending"])


async def until_nothing_pending(client: aioredis.Redis) -> None:
    async with asyncio.timeout(3):
        while await pending(client):
            await asyncio.sleep(0.02)


async def test_a_job_runs_to_success_and_its_result_expires(
    queue: JobQueue, runner: FakeRunner, client: aioredis.Redis
) -> None:
    job = await queue.submit("acme", work("r1"), owner="sha256:feed")
    assert job.state == jobs_pb2.JOB_STATE_QUEUED
    assert job.attempts == 0
    assert len(job.job_id) == 32
    assert await client.ttl(f"strata:job:{{acme}}:{job.job_id}") == -1

    async with working(queue, runner):
        done = await ended(queue, "acme", job.job_id)
        await until_nothing_pending(client)

    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert done.attempts == 1
    # The work's request id (what usage is settled by) is the job id.
    assert done.generate.request_id == job.job_id
    assert done.generate.text == "answer for acme"
    assert done.create_time == job.create_time
    assert done.update_time.ToNanoseconds() > job.update_time.ToNanoseconds()
    assert runner.calls == [("acme", job.job_id)]
    # The owner reaches the runner with the queued entry, and is kept nowhere else.
    assert runner.owners == ["sha256:feed"]
    stored = await client.get(f"strata:job:{{acme}}:{job.job_id}:work")
    assert stored is not None and b"feed" not in stored
    assert await queue.get("acme", job.job_id) == done
    for key in (job.job_id, f"{job.job_id}:work", "request:r1"):
        assert 0 < await client.ttl(f"strata:job:{{acme}}:{key}") <= TTL_S
    assert await client.xlen(STREAM) == 0


async def test_submit_is_idempotent_by_request_id_within_a_tenant(
    queue: JobQueue, client: aioredis.Redis
) -> None:
    first = await queue.submit("acme", work("r1"))
    again = await queue.submit("acme", work("r1"))
    other_tenant = await queue.submit("globex", work("r1"))

    assert again == first
    assert other_tenant.job_id != first.job_id
    assert await client.xlen(STREAM) == 2
    with pytest.raises(IdempotencyKeyReused) as refused:
        await queue.submit("acme", work("r1", model="another"))
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert await client.xlen(STREAM) == 2


async def test_submit_refuses_a_bad_request_id_or_missing_work(queue: JobQueue) -> None:
    with pytest.raises(RequestInvalid) as refused:
        await queue.submit("acme", jobs_pb2.SubmitJobRequest(request_id="has space"))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in refused.value.violations] == ["request_id", "work"]
    with pytest.raises(RequestInvalid):
        await queue.submit("acme", work(""))


async def test_a_pipeline_job_gets_the_job_id_as_its_request_id(
    queue: JobQueue, client: aioredis.Redis
) -> None:
    pipeline = pipelines_pb2.RunPipelineRequest(pipeline="summarise", request_id="mine")
    job = await queue.submit("acme", jobs_pb2.SubmitJobRequest(request_id="p1", pipeline=pipeline))
    stored = await client.get(f"strata:job:{{acme}}:{job.job_id}:work")
    assert isinstance(stored, bytes)
    assert jobs_pb2.SubmitJobRequest.FromString(stored).pipeline.request_id == job.job_id


async def test_failures_end_the_job_failed_with_code_and_reason(
    queue: JobQueue, runner: FakeRunner, client: aioredis.Redis
) -> None:
    down = await queue.submit("acme", work("r1", model="down"))
    boom = await queue.submit("acme", work("r2", model="boom"))
    told = await queue.submit("acme", work("r3", model="error-result"))

    async with working(queue, runner):
        down_job = await ended(queue, "acme", down.job_id)
        boom_job = await ended(queue, "acme", boom.job_id)
        told_job = await ended(queue, "acme", told.job_id)
        await until_nothing_pending(client)

    assert down_job.state == jobs_pb2.JOB_STATE_FAILED
    assert down_job.error == jobs_pb2.JobError(
        code="UNAVAILABLE", reason="PROVIDER_UNAVAILABLE", message="the provider is down"
    )
    assert boom_job.state == jobs_pb2.JOB_STATE_FAILED
    assert boom_job.error == jobs_pb2.JobError(
        code="INTERNAL", reason="INTERNAL", message="internal error"
    )
    assert told_job.state == jobs_pb2.JOB_STATE_FAILED
    assert told_job.error.reason == "X"
    assert 0 < await client.ttl(f"strata:job:{{acme}}:{down.job_id}") <= TTL_S


async def test_a_job_cancelled_while_queued_never_runs(
    queue: JobQueue, runner: FakeRunner, client: aioredis.Redis
) -> None:
    job = await queue.submit("acme", work("r1"))
    cancelled = await queue.cancel("acme", job.job_id)
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    assert await queue.cancel("acme", job.job_id) == cancelled
    assert await queue.start("acme", job.job_id) is None
    later = await queue.submit("acme", work("r2"))

    async with working(queue, runner):
        assert (await ended(queue, "acme", later.job_id)).state == jobs_pb2.JOB_STATE_SUCCEEDED
        await until_nothing_pending(client)

    assert runner.calls == [("acme", later.job_id)]
    assert await queue.get("acme", job.job_id) == cancelled
    assert await client.xlen(STREAM) == 0


async def test_cancelling_a_running_job_cancels_its_runner(
    queue: JobQueue, runner: FakeRunner, client: aioredis.Redis
) -> None:
    job = await queue.submit("acme", work("r1", model="hang"))

    async with working(queue, runner):
        async with asyncio.timeout(5):
            assert await runner.started.get() == job.job_id
        cancelled = await queue.cancel("acme", job.job_id)
        assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
        async with asyncio.timeout(2):
            assert await runner.cancelled.get() == job.job_id
        await until_nothing_pending(client)

    final = await queue.get("acme", job.job_id)
    assert final == cancelled
    assert final.attempts == 1
    assert not final.HasField("error")


async def test_finishing_and_cancelling_at_once_end_in_one_terminal_state(
    queue: JobQueue,
) -> None:
    outcomes = set()
    for i in range(20):
        job = await queue.submit("acme", work(f"r{i}"))
        assert await queue.start("acme", job.job_id) is not None
        result = jobs_pb2.Job(generate=orchestrator_pb2.GenerateResponse(text="done"))
        finished, cancelled = await asyncio.gather(
            queue.finish("acme", job.job_id, jobs_pb2.JOB_STATE_SUCCEEDED, result=result),
            queue.cancel("acme", job.job_id),
        )
        stored = await queue.get("acme", job.job_id)
        assert finished == cancelled == stored
        assert stored.state in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_CANCELLED)
        assert stored.HasField("generate") == (stored.state == jobs_pb2.JOB_STATE_SUCCEEDED)
        outcomes.add(stored.state)
    assert outcomes


async def test_watch_yields_every_state_until_the_end(queue: JobQueue, runner: FakeRunner) -> None:
    job = await queue.submit("acme", work("r1", model="sleep:0.3"))
    seen: list[jobs_pb2.Job] = []
    first = asyncio.Event()

    async def watch() -> None:
        async with contextlib.aclosing(queue.watch("acme", job.job_id)) as changes:
            async for change in changes:
                seen.append(change)
                first.set()

    watcher = asyncio.create_task(watch())
    async with asyncio.timeout(5):
        await first.wait()
        async with working(queue, runner):
            await watcher

    assert [s.state for s in seen] == [
        jobs_pb2.JOB_STATE_QUEUED,
        jobs_pb2.JOB_STATE_RUNNING,
        jobs_pb2.JOB_STATE_SUCCEEDED,
    ]
    assert seen[0] == job
    assert seen[-1] == await queue.get("acme", job.job_id)


async def test_list_pages_newest_first_with_a_state_filter(
    queue: JobQueue, client: aioredis.Redis
) -> None:
    jobs = [await queue.submit("acme", work(f"r{i}")) for i in range(5)]
    ids = [job.job_id for job in jobs]
    for i in (1, 3):
        await queue.cancel("acme", ids[i])
    await queue.submit("globex", work("g1"))

    pages, token = [], ""
    while True:
        page, token = await queue.list("acme", 2, token)
        pages.append([job.job_id for job in page])
        if not token:
            break
    assert pages == [[ids[4], ids[3]], [ids[2], ids[1]], [ids[0]]]

    everything, token = await queue.list("acme", 0, "")
    assert [job.job_id for job in everything] == ids[::-1]
    assert token == ""

    cancelled, token = await queue.list("acme", 2, "", jobs_pb2.JOB_STATE_CANCELLED)
    assert [job.job_id for job in cancelled] == [ids[3], ids[1]]
    assert all(job.state == jobs_pb2.JOB_STATE_CANCELLED for job in cancelled)
    assert token == ""

    queued, token = await queue.list("acme", 1, "", jobs_pb2.JOB_STATE_QUEUED)
    assert [job.job_id for job in queued] == [ids[4]]
    with pytest.raises(RequestInvalid):
        await queue.list("acme", 1, token, jobs_pb2.JOB_STATE_CANCELLED)
    queued, token = await queue.list("acme", 5, token, jobs_pb2.JOB_STATE_QUEUED)
    assert [job.job_id for job in queued] == [ids[2], ids[0]]

    # A job whose record expired leaves the index when a list passes it.
    await client.delete(f"strata:job:{{acme}}:{ids[2]}")
    page, _ = await queue.list("acme", 10, "")
    assert ids[2] not in [job.job_id for job in page]
    assert await client.zscore("strata:job:{acme}:index", ids[2]) is None

    for bad in ("not a token", "MTox"):
        with pytest.raises(RequestInvalid):
            await queue.list("acme", 2, bad)
    with pytest.raises(RequestInvalid):
        await queue.list("acme", -1, "")


async def test_another_tenants_job_is_not_found(queue: JobQueue) -> None:
    job = await queue.submit("acme", work("r1"))

    for call in (queue.get, queue.cancel):
        with pytest.raises(JobNotFound) as missing:
            await call("globex", job.job_id)
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        assert missing.value.reason == "JOB_NOT_FOUND"
    with pytest.raises(JobNotFound):
        async with contextlib.aclosing(queue.watch("globex", job.job_id)) as changes:
            await anext(changes)
    for unknown in ("0" * 32, "index", ""):
        with pytest.raises(JobNotFound):
            await queue.get("acme", unknown)
    assert await queue.list("globex", 10, "") == ([], "")
    assert (await queue.get("acme", job.job_id)).state == jobs_pb2.JOB_STATE_QUEUED


async def test_a_job_of_a_dead_worker_is_taken_over_and_finished(
    queue: JobQueue, runner: FakeRunner, client: aioredis.Redis
) -> None:
    job = await queue.submit("acme", work("r1", model="hang-once"))

    async with killed_after_start(queue, runner, "dies"):
        pass
    held = await queue.get("acme", job.job_id)
    assert held.state == jobs_pb2.JOB_STATE_RUNNING
    assert held.attempts == 1
    assert await pending(client) == 1

    async with working(queue, runner, "survivor"):
        done = await ended(queue, "acme", job.job_id)
        await until_nothing_pending(client)

    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert done.attempts == 2
    assert runner.calls == [("acme", job.job_id)] * 2


async def test_a_live_workers_long_job_is_not_taken_over(
    queue: JobQueue, runner: FakeRunner, client: aioredis.Redis
) -> None:
    # Runs three times the idle time after which a silent worker's job is taken over.
    job = await queue.submit("acme", work("r1", model="sleep:1.5"))

    async with working(queue, runner, "first"):
        async with asyncio.timeout(5):
            await runner.started.get()
        async with working(queue, runner, "second"):
            done = await ended(queue, "acme", job.job_id)

    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert done.attempts == 1
    assert len(runner.calls) == 1
    assert await pending(client) == 0


async def test_a_job_whose_workers_keep_dying_fails_after_max_attempts(
    client: aioredis.Redis, runner: FakeRunner
) -> None:
    queue = JobQueue(client, result_ttl_s=TTL_S, claim_idle_s=0.3, max_attempts=2)
    job = await queue.submit("acme", work("r1", model="hang"))

    for name in ("first", "second"):
        async with killed_after_start(queue, runner, name):
            pass
    async with working(queue, runner, "third"):
        done = await ended(queue, "acme", job.job_id)
        await until_nothing_pending(client)

    assert done.state == jobs_pb2.JOB_STATE_FAILED
    assert done.attempts == 2
    assert done.error.reason == "JOB_ATTEMPTS_EXHAUSTED"
    assert done.error.code == "INTERNAL"
    assert len(runner.calls) == 2


async def test_stop_lets_jobs_finish_within_the_grace_then_leaves_them_to_others(
    queue: JobQueue, runner: FakeRunner, client: aioredis.Redis
) -> None:
    short = await queue.submit("acme", work("r1", model="sleep:0.2"))
    long = await queue.submit("acme", work("r2", model="hang-once"))
    worker = Worker(queue, runner, name="leaving", heartbeat_s=0.1)
    task = asyncio.create_task(worker.run())
    async with asyncio.timeout(5):
        await runner.started.get()
        await runner.started.get()

    await worker.stop(0.5)
    await task

    assert (await queue.get("acme", short.job_id)).state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert (await queue.get("acme", long.job_id)).state == jobs_pb2.JOB_STATE_RUNNING
    assert runner.cancelled.get_nowait() == long.job_id
    assert await pending(client) == 1
    # Handed back: already idle long enough for any worker to take it over.
    [entry] = await client.xpending_range(STREAM, GROUP, "-", "+", 10)
    assert int(entry["time_since_delivered"]) >= queue.claim_idle_s * 1000
    async with working(queue, runner, "next"):
        done = await ended(queue, "acme", long.job_id)
    assert done.state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert done.attempts == 2


def test_a_worker_must_beat_faster_than_jobs_are_taken_over(queue: JobQueue) -> None:
    with pytest.raises(ValueError, match="heartbeat_s"):
        Worker(queue, FakeRunner(), name="w", heartbeat_s=queue.claim_idle_s)
