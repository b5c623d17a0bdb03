"""`strata jobs`: generate calls that run without holding a connection (JobService).

    strata jobs submit --model M PROMPT... [--route R] [--watch]
    strata jobs get ID
    strata jobs watch ID          state changes on stderr, the answer on stdout
    strata jobs cancel ID
    strata jobs list [--state running] [--limit 20]

`watch` (and `submit --watch`) exits 0 when the job succeeds and 1 when it fails (with the
job's gRPC code and reason) or is cancelled.
"""

from __future__ import annotations

import argparse
import sys
import uuid
from collections.abc import Sequence

import grpc

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import jobs_pb2, jobs_pb2_grpc, orchestrator_pb2
from strata_cli.client import (
    Metadata,
    add_orchestrator_arguments,
    call_orchestrator,
    message_dict,
    print_json,
    usage_error,
)

STATES: dict[str, jobs_pb2.JobState] = {
    "queued": jobs_pb2.JOB_STATE_QUEUED,
    "running": jobs_pb2.JOB_STATE_RUNNING,
    "succeeded": jobs_pb2.JOB_STATE_SUCCEEDED,
    "failed": jobs_pb2.JOB_STATE_FAILED,
    "cancelled": jobs_pb2.JOB_STATE_CANCELLED,
}
TERMINAL = frozenset(
    (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED)
)
WATCH_TIMEOUT_S = 3600.0


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds `strata jobs` and its subcommands."""
    jobs = commands.add_parser("jobs", help="submit, get, watch, cancel, list jobs")
    verbs = jobs.add_subparsers(dest="verb", required=True)

    submit = verbs.add_parser("submit", help="queue a generate call")
    submit.add_argument("prompt", nargs="+", help="the user message")
    target = submit.add_mutually_exclusive_group()
    target.add_argument("--model", help="model alias (default: mock-small)")
    target.add_argument("--route", help="a route instead of a model")
    submit.add_argument("--system", help="a system message")
    submit.add_argument("--max-output-tokens", type=int)
    submit.add_argument("--temperature", type=float)
    submit.add_argument("--request-id", default="", help="idempotency id (default: fresh)")
    submit.add_argument("--watch", action="store_true", help="then watch it to its end")
    submit.set_defaults(run=run_submit)

    get = verbs.add_parser("get", help="read a job")
    get.add_argument("job_id", metavar="ID")
    get.set_defaults(run=run_get)

    watch = verbs.add_parser("watch", help="follow a job to its end")
    watch.add_argument("job_id", metavar="ID")
    watch.set_defaults(run=run_watch)

    cancel = verbs.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id", metavar="ID")
    cancel.add_argument("--request-id", default="", help="idempotency id (default: fresh)")
    cancel.set_defaults(run=run_cancel)

    listing = verbs.add_parser("list", help="your jobs, newest first")
    listing.add_argument("--state", choices=sorted(STATES))
    listing.add_argument("--limit", type=int, default=20, help="most jobs to show (1 to 1000)")
    listing.set_defaults(run=run_list)

    for verb in (submit, get, watch, cancel, listing):
        add_orchestrator_arguments(verb)


def state_name(state: int) -> str:
    """`SUCCEEDED` for JOB_STATE_SUCCEEDED."""
    return str(jobs_pb2.JobState.Name(state)).removeprefix("JOB_STATE_")


def generate_request(
    prompt: str,
    model: str | None = None,
    route: str | None = None,
    system: str | None = None,
    max_output_tokens: int | None = None,
    temperature: float | None = None,
) -> orchestrator_pb2.GenerateRequest:
    """The GenerateRequest a job runs."""
    messages = []
    if system:
        messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=system))
    messages.append(common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt))
    params = common_pb2.GenerationParams()
    if max_output_tokens is not None:
        params.max_output_tokens = max_output_tokens
    if temperature is not None:
        params.temperature = temperature
    request = orchestrator_pb2.GenerateRequest(messages=messages, params=params)
    if route:
        request.route = route
    else:
        request.model = model or "mock-small"
    return request


def format_job(job: jobs_pb2.Job) -> str:
    """The job, readably: id, state, times, and its answer or error."""
    lines = [f"{'job':<10}{job.job_id}", f"{'state':<10}{state_name(job.state)}"]
    if job.HasField("create_time"):
        lines.append(f"{'created':<10}{job.create_time.ToJsonString()}")
    if job.HasField("update_time"):
        lines.append(f"{'updated':<10}{job.update_time.ToJsonString()}")
    lines.append(f"{'attempts':<10}{job.attempts}")
    if job.HasField("error") and (job.error.code or job.error.reason):
        lines.append(f"{'error':<10}{job_error(job)}")
    result = job.WhichOneof("result")
    if result == "generate":
        answer = job.generate
        reason = common_pb2.FinishReason.Name(answer.finish_reason).removeprefix("FINISH_REASON_")
        lines.append(f"{'request':<10}{answer.request_id}")
        lines.append(f"{'model':<10}{answer.model}")
        lines.append(
            f"{'usage':<10}{answer.usage.input_tokens} in / {answer.usage.output_tokens} out"
            f" tokens · ${answer.cost.total_usd_micros / 1e6:.6f} · {reason.lower()}"
        )
        lines.append(f"{'output':<10}")
        lines.extend("  " + line for line in answer.text.splitlines())
    elif result == "pipeline":
        lines.append(f"{'pipeline':<10}{len(job.pipeline.ListFields())} fields (see --json)")
    return "\n".join(lines)


def job_error(job: jobs_pb2.Job) -> str:
    """`CODE REASON: message`, as errors are printed."""
    error = job.error
    return f"{error.code} {error.reason}: {error.message}".replace("  ", " ")


def format_jobs(jobs: Sequence[jobs_pb2.Job]) -> str:
    """One line a job: id, state, created, attempts."""
    if not jobs:
        return "(no jobs)"
    width = max(len(j.job_id) for j in jobs) + 2
    return "\n".join(
        f"{j.job_id:<{width}}{state_name(j.state):<11}"
        f"{j.create_time.ToJsonString() if j.HasField('create_time') else '-':<32}"
        f"attempts {j.attempts}"
        for j in jobs
    )


def _stub(channel: grpc.Channel) -> jobs_pb2_grpc.JobServiceStub:
    return jobs_pb2_grpc.JobServiceStub(channel)


def _outcome(job: jobs_pb2.Job) -> int:
    """0 for a job that succeeded, 1 (and why on stderr) for one that did not."""
    if job.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        return 0
    if job.state == jobs_pb2.JOB_STATE_FAILED:
        print(f"error: job {job.job_id} failed: {job_error(job)}", file=sys.stderr)
    else:
        print(f"error: job {job.job_id} is {state_name(job.state)}", file=sys.stderr)
    return 1


def watch(channel: grpc.Channel, metadata: Metadata, job_id: str, as_json: bool) -> int:
    """Follows the job to its end: states on stderr, then the answer (or the job as JSON)."""
    last: jobs_pb2.Job | None = None
    for update in _stub(channel).WatchJob(
        jobs_pb2.WatchJobRequest(job_id=job_id), metadata=metadata, timeout=WATCH_TIMEOUT_S
    ):
        if last is None or update.job.state != last.state:
            print(f"[{job_id} · {state_name(update.job.state)}]", file=sys.stderr, flush=True)
        last = update.job
        if last.state in TERMINAL:
            break
    if last is None or last.state not in TERMINAL:
        print(f"error: the watch of job {job_id} ended before the job did", file=sys.stderr)
        return 1
    if as_json:
        print_json(last)
    elif last.WhichOneof("result") == "generate":
        print(last.generate.text)
    elif last.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        print(format_job(last))
    return _outcome(last)


def run_submit(args: argparse.Namespace) -> int:
    """`strata jobs submit`."""
    request = jobs_pb2.SubmitJobRequest(
        request_id=args.request_id or uuid.uuid4().hex,
        generate=generate_request(
            " ".join(args.prompt),
            args.model,
            args.route,
            args.system,
            args.max_output_tokens,
            args.temperature,
        ),
    )

    def body(channel: grpc.Channel, metadata: Metadata) -> int:
        job = _stub(channel).SubmitJob(request, metadata=metadata, timeout=30).job
        if args.watch:
            print(f"submitted {job.job_id}", file=sys.stderr)
            return watch(channel, metadata, job.job_id, args.json)
        if args.json:
            print_json(job)
        else:
            print(f"{job.job_id} {state_name(job.state)}")
        return 0

    return call_orchestrator(args, body)


def run_get(args: argparse.Namespace) -> int:
    """`strata jobs get`."""

    def body(channel: grpc.Channel, metadata: Metadata) -> int:
        job = (
            _stub(channel)
            .GetJob(jobs_pb2.GetJobRequest(job_id=args.job_id), metadata=metadata, timeout=10)
            .job
        )
        if args.json:
            print_json(job)
        else:
            print(format_job(job))
        return 0

    return call_orchestrator(args, body)


def run_watch(args: argparse.Namespace) -> int:
    """`strata jobs watch`."""
    return call_orchestrator(
        args, lambda channel, metadata: watch(channel, metadata, args.job_id, args.json)
    )


def run_cancel(args: argparse.Namespace) -> int:
    """`strata jobs cancel`."""

    def body(channel: grpc.Channel, metadata: Metadata) -> int:
        job = (
            _stub(channel)
            .CancelJob(
                jobs_pb2.CancelJobRequest(
                    request_id=args.request_id or uuid.uuid4().hex, job_id=args.job_id
                ),
                metadata=metadata,
                timeout=10,
            )
            .job
        )
        if args.json:
            print_json(job)
        else:
            print(f"{job.job_id} {state_name(job.state)}")
        return 0

    return call_orchestrator(args, body)


def run_list(args: argparse.Namespace) -> int:
    """`strata jobs list`."""
    if not 1 <= args.limit <= 1000:
        return usage_error("--limit must be 1 to 1000")

    def body(channel: grpc.Channel, metadata: Metadata) -> int:
        found: list[jobs_pb2.Job] = []
        token = ""
        while len(found) < args.limit:
            page = _stub(channel).ListJobs(
                jobs_pb2.ListJobsRequest(
                    page_size=args.limit - len(found),
                    page_token=token,
                    state=STATES[args.state] if args.state else jobs_pb2.JOB_STATE_UNSPECIFIED,
                ),
                metadata=metadata,
                timeout=10,
            )
            found.extend(page.jobs)
            token = page.next_page_token
            if not token:
                break
        if args.json:
            data = message_dict(jobs_pb2.ListJobsResponse(jobs=found[: args.limit]))
            data.setdefault("jobs", [])
            print_json(data)
        else:
            print(format_jobs(found[: args.limit]))
        return 0

    return call_orchestrator(args, body)
