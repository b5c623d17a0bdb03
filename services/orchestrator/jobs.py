"""Async jobs: a queue on a Redis Stream, workers that run it, and the jobs' states.

A job, once accepted, reaches a terminal state (SUCCEEDED, FAILED or CANCELLED) even if
the worker holding it dies: its stream entry stays pending until a worker has stored the
terminal state, and a pending entry that nobody refreshed for `claim_idle_s` is taken over
by another worker (XAUTOCLAIM) and run again. Execution is therefore at least once; the
runner settles usage by the work's request id, which is the job id, so a job is charged
once however often it runs.

Redis layout (a tenant's keys share the hash tag `{<tenant>}`):

    strata:job:{T}:<job id>             the Job (protobuf); terminal ones expire after the TTL
    strata:job:{T}:<job id>:work        the SubmitJobRequest to run (work's request id = job id)
    strata:job:{T}:request:<request>    job id of a SubmitJob request id (idempotency)
    strata:job:{T}:index                zset job id -> create time (us), for listing
    strata:jobs                         the stream: one entry (tenant, job_id) per job
    channel strata:job:{T}:<job id>:changes   each new state of the job (its bytes)
    channel strata:jobs:cancelled       "<tenant>\\n<job id>" when a running job is cancelled

Every state change is a compare-and-set script (the new Job is written only if the stored
one is still the one the change was computed from), so a cancel racing a start or a finish
leaves exactly one outcome: a job cancelled while queued is never started, and a job
finishing while being cancelled ends in whichever terminal state was stored first. Each
change also publishes the new state, from the same script, for `JobQueue.watch`.

Submitting touches the tenant's keys and the stream in one script, so the queue needs a
standalone Redis (or one whose stream shares the tenant's slot), not a Cluster.
"""

from __future__ import annotations

import asyncio
import base64
import builtins
import contextlib
import contextvars
import logging
import re
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
import redis.asyncio as redis
from google.protobuf import timestamp_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from redis.exceptions import RedisError, ResponseError

from services.common import semconv, telemetry
from services.common.calls import RERUN_IF_CUT
from services.common.errors import FieldViolation, JobNotFound, RequestInvalid, StrataError
from services.common.redis_state import redis_errors
from services.common.tasks import cancel_and_wait
from services.common.validation import check_name, check_request_id
from services.orchestrator.idempotency import IdempotencyKeyReused
from strata.orchestrator.v1 import jobs_pb2

log = logging.getLogger(__name__)

Runner = Callable[[str, str, jobs_pb2.SubmitJobRequest], Coroutine[Any, Any, jobs_pb2.Job]]
"""Runs a job's work for (tenant, owner, work) and returns a Job with the result or the error
filled; `owner` is what `submit` was given (the orchestrator: the submitting key's hash).

It may raise StrataError (the job fails with its code, reason and message) and is cancelled
when the job is cancelled. The work's request id is the job id: settle usage by it.
"""

TERMINAL = frozenset(
    {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED}
)
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
WATCH_REREAD_S = 5.0
"""A watch re-reads the job this often when no change arrived (a missed message is found)."""
_JOB_ID = re.compile(r"[0-9a-f]{32}")
_TENANT = re.compile(r"[^{}\s]+")
_STORE_TRIES = 6

# KEYS 1 request mapping  2 job  3 work  4 index  5 stream
# ARGV 1 job id  2 job  3 work  4 score (create time, us)  5 tenant  6 job key prefix  7 owner
#      8 the submitting request's W3C traceparent ('' for none)
# Returns the id of the job already holding the request id, or '' when this one was queued.
_SUBMIT = """
local existing = redis.call('GET', KEYS[1])
if existing and redis.call('EXISTS', ARGV[6] .. existing) == 1 then
  return existing
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('XADD', KEYS[5], '*', 'tenant', ARGV[5], 'job_id', ARGV[1], 'owner', ARGV[7],
  'trace', ARGV[8])
return ''
"""

# KEYS 1 job  2 work  3 request mapping
# ARGV 1 the job as read  2 the new job  3 TTL (s; 0: none)  4 changes channel
#      5 channel telling workers of a cancel ('' for none)  6 its message
# Returns 1 when written, 0 when the job changed since it was read.
_CHANGE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then
  for i = 1, 3 do
    redis.call('EXPIRE', KEYS[i], ttl)
  end
end
redis.call('PUBLISH', ARGV[4], ARGV[2])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return 1
"""


def _now() -> timestamp_pb2.Timestamp:
    now = timestamp_pb2.Timestamp()
    now.FromNanoseconds(time.time_ns())
    return now


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _progress(job: jobs_pb2.Job) -> tuple[bool, int]:
    """Grows with every change of a job: a start adds an attempt, the end is terminal."""
    return job.state in TERMINAL, job.attempts


def _ended(
    current: jobs_pb2.Job,
    state: jobs_pb2.JobState,
    *,
    result: jobs_pb2.Job | None = None,
    error: jobs_pb2.JobError | None = None,
) -> jobs_pb2.Job:
    ended = jobs_pb2.Job()
    ended.CopyFrom(current)
    ended.state = state
    ended.update_time.CopyFrom(_now())
    ended.ClearField("result")
    ended.ClearField("error")
    if result is not None:
        if result.HasField("generate"):
            ended.generate.CopyFrom(result.generate)
        elif result.HasField("pipeline"):
            ended.pipeline.CopyFrom(result.pipeline)
        if result.HasField("error"):
            ended.error.CopyFrom(result.error)
    if error is not None:
        ended.error.CopyFrom(error)
    return ended


@dataclass(frozen=True)
class _Started:
    job: jobs_pb2.Job
    work: jobs_pb2.SubmitJobRequest


class JobQueue:
    """Jobs of every tenant: submitting, reading, watching, cancelling and listing them.

    The client must return bytes (`decode_responses=False`, as `redis_state.connect`
    makes it). Redis being unreachable raises UNAVAILABLE/REDIS_UNAVAILABLE.
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        stream: str = "strata:jobs",
        group: str = "workers",
        result_ttl_s: int = 86400,
        claim_idle_s: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        if client.get_connection_kwargs().get("decode_responses"):
            raise ValueError("the job queue needs a Redis client with decode_responses=False")
        if result_ttl_s < 1 or claim_idle_s <= 0 or max_attempts < 1:
            raise ValueError("result_ttl_s, claim_idle_s and max_attempts must be positive")
        self.client = client
        self.stream = stream
        self.group = group
        self.result_ttl_s = result_ttl_s
        self.claim_idle_s = claim_idle_s
        self.max_attempts = max_attempts
        self.cancel_channel = f"{stream}:cancelled"
        """Workers listen here for running jobs that were cancelled."""
        self._submit = client.register_script(_SUBMIT)
        self._change = client.register_script(_CHANGE)

    # --- keys ------------------------------------------------------------------------

    @staticmethod
    def _prefix(tenant: str) -> str:
        if not _TENANT.fullmatch(tenant):
            raise ValueError(f"tenant {tenant!r} cannot name Redis keys")
        return f"strata:job:{{{tenant}}}:"

    def _job_key(self, tenant: str, job_id: str) -> str:
        return self._prefix(tenant) + job_id

    def _changes_channel(self, tenant: str, job_id: str) -> str:
        return self._prefix(tenant) + job_id + ":changes"

    # --- the API -----------------------------------------------------------------------

    async def submit(
        self, tenant: str, request: jobs_pb2.SubmitJobRequest, owner: str = ""
    ) -> jobs_pb2.Job:
        """Queues the request's work as a new job, or returns the job already made for its
        request id. The work's own request id is replaced by the job id, which the runner
        settles by. The work itself is checked when it runs (a bad one ends FAILED). `owner`
        travels with the queued entry to the runner (never into the stored job)."""
        violations = []
        if violation := check_request_id(request.request_id):
            violations.append(violation)
        if request.WhichOneof("work") is None:
            violations.append(FieldViolation("work", "exactly one of generate, pipeline"))
        if violations:
            raise RequestInvalid(violations)
        prefix = self._prefix(tenant)
        job_id = uuid.uuid4().hex
        work = self._work_of(request, job_id)
        now = _now()
        job = jobs_pb2.Job(
            job_id=job_id, state=jobs_pb2.JOB_STATE_QUEUED, create_time=now, update_time=now
        )
        mapping = f"{prefix}request:{request.request_id}"
        with redis_errors():
            existing = await self._submit(
                keys=[
                    mapping,
                    prefix + job_id,
                    f"{prefix}{job_id}:work",
                    prefix + "index",
                    self.stream,
                ],
                args=[
                    job_id,
                    job.SerializeToString(),
                    work.SerializeToString(deterministic=True),
                    now.ToMicroseconds(),
                    tenant,
                    prefix,
                    owner,
                    _traceparent(),
                ],
            )
        if not existing:
            return job
        return await self._existing(tenant, _text(existing), request)

    async def get(self, tenant: str, job_id: str) -> jobs_pb2.Job:
        """The job; JOB_NOT_FOUND when the tenant has no such job."""
        _check_job_id(job_id)
        with redis_errors():
            raw: Any = await self.client.get(self._job_key(tenant, job_id))
        if raw is None:
            raise JobNotFound(job_id)
        return jobs_pb2.Job.FromString(raw)

    async def watch(self, tenant: str, job_id: str) -> AsyncGenerator[jobs_pb2.Job, None]:
        """Yields the job as it is, then each change of it, and ends after a terminal one."""
        _check_job_id(job_id)
        async with self.client.pubsub() as pubsub:
            # Subscribe before reading: a change made after the read is then published to
            # us, and one made before it is in what we read; stale messages are skipped.
            with redis_errors():
                await pubsub.subscribe(self._changes_channel(tenant, job_id))
            last = await self.get(tenant, job_id)
            yield last
            while last.state not in TERMINAL:
                with redis_errors():
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=WATCH_REREAD_S
                    )
                if message is None:
                    job = await self.get(tenant, job_id)
                elif message["type"] == "message":
                    job = jobs_pb2.Job.FromString(message["data"])
                else:
                    continue
                if _progress(job) > _progress(last):
                    last = job
                    yield job

    async def cancel(self, tenant: str, job_id: str) -> jobs_pb2.Job:
        """Cancels a queued or running job (its worker is told and stops running it); a job
        that already ended is returned unchanged."""
        _check_job_id(job_id)

        def cancelled(job: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if job.state in TERMINAL:
                return None
            return _ended(job, jobs_pb2.JOB_STATE_CANCELLED)

        changed = await self._transition(tenant, job_id, cancelled)
        if changed is None:
            raise JobNotFound(job_id)
        return changed[0]

    async def list(
        self, tenant: str, page_size: int, page_token: str, state: int = 0
    ) -> tuple[builtins.list[jobs_pb2.Job], str]:
        """A page of the tenant's jobs, newest first, optionally only those in `state`.

        A page may hold fewer jobs than asked (at most ten times the page size are
        examined per call) and still have a next page; the last page has no token.
        """
        violations = []
        if page_size < 0:
            violations.append(FieldViolation("page_size", "must not be negative"))
        if state not in jobs_pb2.JobState.values():
            violations.append(FieldViolation("state", "must be a known state"))
        if violations:
            raise RequestInvalid(violations)
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        position = _parse_token(page_token, state) if page_token else None
        index = self._prefix(tenant) + "index"
        budget = max(1000, 10 * size)
        found: builtins.list[tuple[jobs_pb2.Job, tuple[int, str]]] = []
        gone: builtins.list[str] = []
        end = False
        while not end and len(found) <= size and budget > 0:
            want = min(budget, size + 1)
            rows = await self._index_after(index, position, want)
            end = len(rows) < want
            budget -= len(rows)
            with redis_errors():
                async with self.client.pipeline(transaction=False) as pipe:
                    for job_id, _ in rows:
                        pipe.get(self._job_key(tenant, job_id))
                    raws = await pipe.execute()
            for (job_id, score), raw in zip(rows, raws, strict=True):
                position = (score, job_id)
                if raw is None:
                    gone.append(job_id)
                    continue
                job = jobs_pb2.Job.FromString(raw)
                if not state or job.state == state:
                    found.append((job, position))
                    if len(found) > size:
                        break
        if gone:
            with redis_errors():
                await self.client.zrem(index, *gone)
        if len(found) > size:
            found = found[:size]
            token = _make_token(found[-1][1], state)
        elif end or position is None:
            token = ""
        else:
            token = _make_token(position, state)
        return [job for job, _ in found], token

    # --- what workers use ----------------------------------------------------------------

    async def ensure_group(self) -> None:
        """Creates the stream and its consumer group unless they exist."""
        with redis_errors():
            try:
                # From the stream's start: jobs submitted before any worker ran are kept.
                await self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
            except ResponseError as err:
                if "BUSYGROUP" not in str(err):
                    raise

    async def start(self, tenant: str, job_id: str) -> _Started | None:
        """Marks the job RUNNING for one more attempt; None when there is nothing to run
        (the job ended, was cancelled, expired, or has used up its attempts)."""

        def started(job: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if job.state in TERMINAL:
                return None
            if job.attempts >= self.max_attempts:
                error = jobs_pb2.JobError(
                    code=grpc.StatusCode.INTERNAL.name,
                    reason="JOB_ATTEMPTS_EXHAUSTED",
                    message=f"the job's worker stopped during each of its {job.attempts} attempts",
                )
                return _ended(job, jobs_pb2.JOB_STATE_FAILED, error=error)
            running = jobs_pb2.Job()
            running.CopyFrom(job)
            running.state = jobs_pb2.JOB_STATE_RUNNING
            running.attempts += 1
            running.update_time.CopyFrom(_now())
            return running

        changed = await self._transition(tenant, job_id, started)
        if changed is None:
            return None
        job, work, written = changed
        if not written or job.state != jobs_pb2.JOB_STATE_RUNNING:
            return None
        if work is None:
            error = jobs_pb2.JobError(
                code=grpc.StatusCode.INTERNAL.name, reason="INTERNAL", message="work lost"
            )
            await self.finish(tenant, job_id, jobs_pb2.JOB_STATE_FAILED, error=error)
            return None
        return _Started(job, work)

    async def finish(
        self,
        tenant: str,
        job_id: str,
        state: jobs_pb2.JobState,
        *,
        result: jobs_pb2.Job | None = None,
        error: jobs_pb2.JobError | None = None,
    ) -> jobs_pb2.Job | None:
        """Stores the job's terminal state unless it already has one; the job as stored
        (None when it has expired)."""

        def ended(job: jobs_pb2.Job) -> jobs_pb2.Job | None:
            if job.state in TERMINAL:
                return None
            return _ended(job, state, result=result, error=error)

        changed = await self._transition(tenant, job_id, ended)
        return None if changed is None else changed[0]

    async def ack(self, entry_id: bytes) -> None:
        """Acknowledges a stream entry whose job has ended, and deletes it."""
        with redis_errors():
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xack(self.stream, self.group, entry_id)
                pipe.xdel(self.stream, entry_id)
                await pipe.execute()

    # --- internals ---------------------------------------------------------------------

    @staticmethod
    def _work_of(request: jobs_pb2.SubmitJobRequest, job_id: str) -> jobs_pb2.SubmitJobRequest:
        work = jobs_pb2.SubmitJobRequest()
        work.CopyFrom(request)
        if work.HasField("generate"):
            work.generate.request_id = job_id
        else:
            work.pipeline.request_id = job_id
        return work

    async def _existing(
        self, tenant: str, job_id: str, request: jobs_pb2.SubmitJobRequest
    ) -> jobs_pb2.Job:
        prefix = self._prefix(tenant)
        with redis_errors():
            stored: Any = await self.client.mget(prefix + job_id, f"{prefix}{job_id}:work")
        raw, work = stored
        if raw is None:
            raise JobNotFound(job_id)
        if work is not None and jobs_pb2.SubmitJobRequest.FromString(work) != self._work_of(
            request, job_id
        ):
            raise IdempotencyKeyReused(
                f"request id {request.request_id!r} was used for another job",
                metadata={"request_id": request.request_id},
            )
        return jobs_pb2.Job.FromString(raw)

    async def _transition(
        self,
        tenant: str,
        job_id: str,
        change: Callable[[jobs_pb2.Job], jobs_pb2.Job | None],
    ) -> tuple[jobs_pb2.Job, jobs_pb2.SubmitJobRequest | None, bool] | None:
        """Applies `change` to the stored job atomically: the job after it (as it is when
        `change` returns None), its work, and whether it was written; None when the job
        does not exist.

        A lost race re-reads and retries. That ends: every write moves a job forward (a
        start adds an attempt, an end is final), and a job has few possible moves.
        """
        prefix = self._prefix(tenant)
        job_key, work_key = prefix + job_id, f"{prefix}{job_id}:work"
        while True:
            with redis_errors():
                stored: Any = await self.client.mget(job_key, work_key)
            raw, work_raw = stored
            if raw is None:
                return None
            current = jobs_pb2.Job.FromString(raw)
            work = None if work_raw is None else jobs_pb2.SubmitJobRequest.FromString(work_raw)
            new = change(current)
            if new is None:
                return current, work, False
            payload = new.SerializeToString()
            tell_workers = (
                current.state == jobs_pb2.JOB_STATE_RUNNING
                and new.state == jobs_pb2.JOB_STATE_CANCELLED
            )
            request_id = "" if work is None else work.request_id
            with redis_errors():
                written = await self._change(
                    keys=[job_key, work_key, f"{prefix}request:{request_id}"],
                    args=[
                        raw,
                        payload,
                        self.result_ttl_s if new.state in TERMINAL else 0,
                        self._changes_channel(tenant, job_id),
                        self.cancel_channel if tell_workers else "",
                        f"{tenant}\n{job_id}",
                    ],
                )
            if written:
                return new, work, True

    async def _index_after(
        self, index: str, position: tuple[int, str] | None, count: int
    ) -> builtins.list[tuple[str, int]]:
        """Up to `count` (job id, score) of the index after `position`, newest first."""
        with redis_errors():
            if position is None:
                rows: Any = await self.client.zrevrangebyscore(
                    index, "+inf", "-inf", start=0, num=count, withscores=True
                )
                return [(_text(m), int(s)) for m, s in rows]
            score, member = position
            # Equal scores list in reverse member order: the ones below `member` come next.
            ties: Any = await self.client.zrangebyscore(index, score, score)
            after = sorted((_text(m) for m in ties if _text(m) < member), reverse=True)
            rows = await self.client.zrevrangebyscore(
                index, f"({score}", "-inf", start=0, num=count, withscores=True
            )
        return ([(m, score) for m in after] + [(_text(m), int(s)) for m, s in rows])[:count]


def _make_token(position: tuple[int, str], state: int) -> str:
    score, job_id = position
    return base64.urlsafe_b64encode(f"{state}:{score}:{job_id}".encode()).decode()


def _parse_token(token: str, state: int) -> tuple[int, str]:
    try:
        made_for, score, job_id = base64.urlsafe_b64decode(token.encode()).decode().split(":")
        position = int(score), job_id
        same_filter = int(made_for) == state
    except ValueError:
        raise RequestInvalid.field("page_token", "is not a token of this list") from None
    if not same_filter or not _JOB_ID.fullmatch(job_id):
        raise RequestInvalid.field("page_token", "was made for another list")
    return position


_ENDED = "ended"
"""The job reached a terminal state elsewhere (it was cancelled): stop running it."""
_SUPERSEDED = "superseded"
"""Another worker took the job over: stop running it and leave its entry to that worker."""


@dataclass(eq=False)
class _Run:
    """A stream entry this worker holds, and the job it is running for it."""

    entry_id: bytes
    tenant: str
    job_id: str
    owner: str = ""
    task: asyncio.Task[None] | None = None
    trace: str = ""
    """The submitting request's traceparent: the run's trace links to it."""
    attempt: int = 0
    runner: asyncio.Task[jobs_pb2.Job] | None = None
    stop_reason: str = ""

    def stop(self, reason: str) -> None:
        self.stop_reason = reason
        if self.runner is not None:
            self.runner.cancel()


class Worker:
    """Runs the queue's jobs in this process, up to `concurrency` at once.

    New jobs come from XREADGROUP; jobs whose worker stopped refreshing them for the
    queue's `claim_idle_s` are taken over with XAUTOCLAIM, every half of that. Every
    `heartbeat_s` the worker re-claims the entries it holds (XCLAIM JUSTID resets their
    idle time, so a long job is not taken from a live worker) and re-reads their jobs:
    one that ended elsewhere or was taken over is stopped. A job's entry is acknowledged
    (and deleted) only once its terminal state is stored.
    """

    def __init__(
        self,
        queue: JobQueue,
        runner: Runner,
        *,
        name: str,
        concurrency: int = 4,
        heartbeat_s: float = 5.0,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if not 0 < heartbeat_s < queue.claim_idle_s:
            raise ValueError(
                "heartbeat_s must be positive and below the queue's claim_idle_s, "
                "or other workers take over jobs this one is running"
            )
        self.queue = queue
        self.name = name
        self._runner = runner
        self._concurrency = concurrency
        self._heartbeat_s = heartbeat_s
        self._reclaim_every_s = queue.claim_idle_s / 2
        # XREADGROUP blocks on a connection whose reads time out at socket_timeout.
        block_s = min(1.0, self._reclaim_every_s)
        socket_timeout = queue.client.get_connection_kwargs().get("socket_timeout")
        if socket_timeout:
            block_s = min(block_s, socket_timeout / 2)
        self._block_ms = max(1, int(block_s * 1000))
        self._claim_cursor: bytes | str = "0-0"
        self._runs: dict[bytes, _Run] = {}
        self._stopping = asyncio.Event()
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._started = False
        self._grace_s = 0.0

    async def run(self) -> None:
        """Takes and runs jobs until `stop`; cancelled, it abandons its jobs unacknowledged
        (other workers take them over, as after a crash)."""
        if self._started:
            raise RuntimeError("a worker runs once")
        self._started = True
        helpers = [
            asyncio.create_task(self._heartbeat(), name=f"{self.name} heartbeat"),
            asyncio.create_task(self._listen_for_cancels(), name=f"{self.name} cancels"),
        ]
        try:
            await self._take_jobs()
            tasks = [run.task for run in self._runs.values() if run.task is not None]
            if tasks:
                await asyncio.wait(tasks, timeout=self._grace_s)
            await self._hand_back(await self._abandon())
        finally:
            await self._abandon()
            for helper in helpers:
                await cancel_and_wait(helper)
            self._done.set()

    async def _abandon(self) -> builtins.list[bytes]:
        """Cancels the jobs still running, leaving their entries pending; the entries of
        those that stopped."""
        left = [(run.entry_id, run.task) for run in self._runs.values() if run.task is not None]
        for _, task in left:
            await cancel_and_wait(task)
        return [entry_id for entry_id, task in left if task.done()]

    async def _hand_back(self, entry_ids: builtins.list[bytes]) -> None:
        """Marks abandoned entries idle for long enough that other workers take them over
        at once instead of after `claim_idle_s`."""
        queue = self.queue
        left: builtins.list[Any] = list(entry_ids)
        if not left:
            return
        try:
            with redis_errors():
                await queue.client.xclaim(
                    queue.stream,
                    queue.group,
                    self.name,
                    min_idle_time=0,
                    message_ids=left,
                    idle=int(queue.claim_idle_s * 1000),
                    justid=True,
                )
        except (StrataError, RedisError) as err:
            log.warning("worker %s could not hand back its jobs (%s)", self.name, err)

    async def stop(self, grace_s: float) -> None:
        """Stops taking jobs, lets running ones finish for up to `grace_s`, then cancels
        them; their entries stay pending and another worker takes them over."""
        self._grace_s = grace_s
        self._stopping.set()
        self._wake.set()
        if self._started:
            await self._done.wait()

    # --- taking jobs ---------------------------------------------------------------------

    async def _take_jobs(self) -> None:
        loop = asyncio.get_running_loop()
        next_reclaim = loop.time()
        backoff_s = 0.0
        group_ready = False
        while not self._stopping.is_set():
            self._wake.clear()
            free = self._concurrency - len(self._runs)
            if free <= 0:
                await self._pause(self._reclaim_every_s)
                continue
            try:
                if not group_ready:
                    await self.queue.ensure_group()
                    group_ready = True
                if loop.time() >= next_reclaim:
                    next_reclaim = loop.time() + self._reclaim_every_s
                    entries = await self._reclaim(free)
                else:
                    entries = await self._read(free)
            except (StrataError, RedisError) as err:
                # NOGROUP: the stream was deleted (e.g. flushed); make it again.
                group_ready = group_ready and "NOGROUP" not in str(err)
                backoff_s = min(max(2 * backoff_s, 0.1), 5.0)
                log.warning(
                    "worker %s cannot take jobs (%s); again in %.1fs", self.name, err, backoff_s
                )
                await self._pause(backoff_s)
                continue
            backoff_s = 0.0
            for entry_id, fields in entries:
                self._dispatch(entry_id, fields)

    async def _pause(self, seconds: float) -> None:
        """Sleeps until `seconds` passed, a job ended or the worker is stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()

    async def _read(self, count: int) -> builtins.list[tuple[bytes, dict[bytes, bytes]]]:
        queue = self.queue
        with redis_errors():
            reply: Any = await queue.client.xreadgroup(
                queue.group, self.name, {queue.stream: ">"}, count=count, block=self._block_ms
            )
        return [entry for _, entries in reply or () for entry in entries]

    async def _reclaim(self, count: int) -> builtins.list[tuple[bytes, dict[bytes, bytes]]]:
        queue = self.queue
        with redis_errors():
            reply: Any = await queue.client.xautoclaim(
                queue.stream,
                queue.group,
                self.name,
                min_idle_time=int(queue.claim_idle_s * 1000),
                start_id=self._claim_cursor,
                count=count,
            )
        self._claim_cursor = reply[0]
        # Entries deleted from the stream come back empty from a Redis before 7.
        claimed = [(i, f) for i, f in reply[1] if i is not None and f is not None]
        if claimed:
            log.info("worker %s took over %d job(s)", self.name, len(claimed))
        return claimed

    def _dispatch(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        if entry_id in self._runs:
            return
        run = _Run(
            entry_id,
            _text(fields.get(b"tenant", b"")),
            _text(fields.get(b"job_id", b"")),
            _text(fields.get(b"owner", b"")),
            trace=_text(fields.get(b"trace", b"")),
        )
        run.task = asyncio.create_task(self._handle(run), name=f"job {run.job_id}")
        self._runs[entry_id] = run
        run.task.add_done_callback(lambda task: self._forget(run, task))

    def _forget(self, run: _Run, task: asyncio.Task[None]) -> None:
        self._runs.pop(run.entry_id, None)
        self._wake.set()
        if not task.cancelled() and (err := task.exception()) is not None:
            # The entry stays pending and is taken over later; a bug here must be seen.
            log.error("worker %s failed on job %s", self.name, run.job_id, exc_info=err)

    # --- running one job -----------------------------------------------------------------

    async def _handle(self, run: _Run) -> None:
        queue = self.queue
        if not _TENANT.fullmatch(run.tenant) or not _JOB_ID.fullmatch(run.job_id):
            log.error("dropping malformed stream entry %r", run.entry_id)
            await self._ack(run)
            return
        try:
            started = await queue.start(run.tenant, run.job_id)
        except (StrataError, RedisError) as err:
            log.warning("job %s not started (%s); it will be taken again", run.job_id, err)
            return
        if started is None:
            await self._ack(run)
            return
        run.attempt = started.job.attempts
        if not run.stop_reason:
            # Cut for any reason but the job's end (a hand-back, a takeover), the run's calls
            # leave their admissions to the run that finishes the job: charged once.
            context = contextvars.copy_context()
            context.run(RERUN_IF_CUT.set, lambda: run.stop_reason != _ENDED)
            span = _job_span(run)
            context.run(otel_context.attach, trace.set_span_in_context(span))
            run.runner = asyncio.create_task(
                self._runner(run.tenant, run.owner, started.work),
                name=f"runner {run.job_id}",
                context=context,
            )
            try:
                await asyncio.wait({run.runner})
            finally:
                if not run.runner.done():
                    await cancel_and_wait(run.runner)
                span.set_attribute(semconv.STATE, run.stop_reason or "done")
                span.end()
        if run.stop_reason == _SUPERSEDED:
            return
        state, result, error = self._outcome(run)
        for attempt in range(_STORE_TRIES):
            try:
                await queue.finish(run.tenant, run.job_id, state, result=result, error=error)
                break
            except (StrataError, RedisError) as err:
                if attempt + 1 == _STORE_TRIES:
                    log.warning("job %s: end not stored (%s); it will run again", run.job_id, err)
                    return
                await asyncio.sleep(min(0.05 * 2**attempt, 1.0))
        await self._ack(run)

    def _outcome(
        self, run: _Run
    ) -> tuple[jobs_pb2.JobState, jobs_pb2.Job | None, jobs_pb2.JobError | None]:
        runner = run.runner
        if runner is None or runner.cancelled():
            if run.stop_reason == _ENDED:
                return jobs_pb2.JOB_STATE_CANCELLED, None, None
            error = jobs_pb2.JobError(
                code=grpc.StatusCode.INTERNAL.name,
                reason="INTERNAL",
                message="the job's run was cancelled unexpectedly",
            )
            return jobs_pb2.JOB_STATE_FAILED, None, error
        err = runner.exception()
        if isinstance(err, StrataError):
            error = jobs_pb2.JobError(code=err.code.name, reason=err.reason, message=err.message)
            return jobs_pb2.JOB_STATE_FAILED, None, error
        if err is not None:
            log.error("job %s failed", run.job_id, exc_info=err)
            error = jobs_pb2.JobError(
                code=grpc.StatusCode.INTERNAL.name, reason="INTERNAL", message="internal error"
            )
            return jobs_pb2.JOB_STATE_FAILED, None, error
        result = runner.result()
        if result.state in TERMINAL:
            return result.state, result, None
        if result.HasField("error"):
            return jobs_pb2.JOB_STATE_FAILED, result, None
        return jobs_pb2.JOB_STATE_SUCCEEDED, result, None

    async def _ack(self, run: _Run) -> None:
        try:
            await self.queue.ack(run.entry_id)
        except StrataError as err:
            # The entry stays pending; whoever takes it over finds the job ended and acks it.
            log.warning("job %s: entry not acknowledged (%s)", run.job_id, err)

    # --- keeping held jobs ---------------------------------------------------------------

    async def _heartbeat(self) -> None:
        queue = self.queue
        while True:
            await asyncio.sleep(self._heartbeat_s)
            await self._measure_queue()
            runs = list(self._runs.values())
            if not runs:
                continue
            try:
                await self._check(runs)
                held: builtins.list[Any] = [
                    run.entry_id for run in runs if run.stop_reason != _SUPERSEDED
                ]
                if held:
                    with redis_errors():
                        await queue.client.xclaim(
                            queue.stream,
                            queue.group,
                            self.name,
                            min_idle_time=0,
                            message_ids=held,
                            justid=True,
                        )
            except (StrataError, RedisError) as err:
                log.warning("worker %s heartbeat failed (%s)", self.name, err)

    async def _measure_queue(self) -> None:
        """The queue's depth and the age of its oldest entry, for the metrics."""
        queue = self.queue
        try:
            async with queue.client.pipeline(transaction=False) as pipe:
                pipe.xlen(queue.stream)
                pipe.xrange(queue.stream, count=1)
                depth, oldest = await pipe.execute()
        except RedisError as err:
            log.debug("queue not measured (%s)", err)
            return
        age_s = 0.0
        if oldest:
            age_s = max(0.0, time.time() - int(_text(oldest[0][0]).split("-")[0]) / 1000)
        made = telemetry.instruments("orchestrator")
        made.gauge(semconv.METRIC_JOB_QUEUE_DEPTH, float(depth))
        made.gauge(semconv.METRIC_JOB_QUEUE_AGE, age_s)

    async def _check(self, runs: builtins.list[_Run]) -> None:
        """Stops the runs whose job ended elsewhere or was started by another worker."""
        started = [run for run in runs if run.attempt and not run.stop_reason]
        if not started:
            return
        with redis_errors():
            async with self.queue.client.pipeline(transaction=False) as pipe:
                for run in started:
                    pipe.get(self.queue._job_key(run.tenant, run.job_id))
                raws = await pipe.execute()
        for run, raw in zip(started, raws, strict=True):
            job = None if raw is None else jobs_pb2.Job.FromString(raw)
            if job is None or job.state in TERMINAL:
                run.stop(_ENDED)
            elif job.attempts != run.attempt:
                log.warning("job %s was taken over by another worker", run.job_id)
                run.stop(_SUPERSEDED)

    async def _listen_for_cancels(self) -> None:
        """Stops running jobs as soon as they are cancelled (the heartbeat would, later)."""
        while True:
            try:
                async with self.queue.client.pubsub() as pubsub:
                    await pubsub.subscribe(self.queue.cancel_channel)
                    # Notices sent before this (re)subscription are lost: look now.
                    await self._check(list(self._runs.values()))
                    while True:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is None or message["type"] != "message":
                            continue
                        tenant, _, job_id = _text(message["data"]).partition("\n")
                        for run in list(self._runs.values()):
                            if run.tenant == tenant and run.job_id == job_id:
                                run.stop(_ENDED)
            except (StrataError, RedisError, OSError) as err:
                log.warning("worker %s lost cancel notices (%s)", self.name, err)
                await asyncio.sleep(1.0)


def _traceparent() -> str:
    """The current trace context as a W3C traceparent ('' outside a trace)."""
    carried = dict(telemetry.inject_metadata([]))
    return str(carried.get("traceparent", ""))


def _job_span(run: _Run) -> trace.Span:
    """The root span of a job's run, linked to the request that submitted the job."""
    submitted = trace.get_current_span(telemetry.extract_metadata([("traceparent", run.trace)]))
    origin = submitted.get_span_context()
    return telemetry.tracer("orchestrator").start_span(
        semconv.SPAN_JOB,
        context=otel_context.Context(),
        links=[trace.Link(origin)] if origin.is_valid else [],
        attributes={
            semconv.JOB_ID: run.job_id,
            semconv.TENANT_ID: run.tenant,
            semconv.ATTEMPT: run.attempt,
        },
    )


def _check_job_id(job_id: str) -> None:
    """REQUEST_INVALID for an id too long to echo back or holding control characters;
    JOB_NOT_FOUND for any other id this queue would not have made."""
    if violation := check_name(job_id, "job_id", required=False):
        raise RequestInvalid([violation])
    if not _JOB_ID.fullmatch(job_id):
        raise JobNotFound(job_id)
