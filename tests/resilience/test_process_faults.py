"""Service processes killed and restarted under load, for real: SIGKILL mid-stream, SIGTERM
with open streams, and a rolling restart of every service while clients keep asking.

    SIGKILL executor mid-stream   the client gets UNAVAILABLE at once (not at its deadline);
                                  the request is settled with what it used, nothing stays
                                  reserved
    SIGKILL orchestrator          the client gets UNAVAILABLE at once; the reservation it
                                  held expires (reservation_ttl_s) and is swept
    SIGTERM with an open stream   health turns NOT_SERVING at once; the stream still ends
                                  with its final chunk within the grace
    rolling restart under load    every request ends in a full answer (the client retries
                                  UNAVAILABLE with the same request id) and is charged once
"""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.devstack import SERVICES, LocalStack, ServiceProcess
from tests.conftest import ApiKeys
from tests.helpers import (
    bearer,
    fresh_stack,
    reserved,
    rich_error,
    usage_record,
    user,
    wait_until_nothing_reserved,
)

RESERVATION_TTL_S = 2
SWEEP_INTERVAL_S = 0.5
GRACE_S = 6.0
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    # A replica that stops cancels what is still open on it when its grace ends; the
    # client did not cancel, and the request id makes the retry safe.
    grpc.StatusCode.CANCELLED,
}
"""What the load loop's client retries (with the same request id)."""


def pin_port(process: ServiceProcess) -> ServiceProcess:
    """Makes the next spawn bind the port the process has now (channels reconnect)."""
    process.port = int(process.address.rsplit(":", 1)[1])
    return process


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
) -> Iterator[LocalStack]:
    """The four services plus a second orchestrator replica, every port pinned."""
    running = fresh_stack(
        tmp_path_factory.mktemp("faults"),
        redis_url,
        tenants_file,
        models_file,
        {
            "STRATA_CONTROL_RESERVATION_TTL_S": str(RESERVATION_TTL_S),
            "STRATA_CONTROL_SWEEP_INTERVAL_S": str(SWEEP_INTERVAL_S),
            "STRATA_ORCHESTRATOR_KNOWLEDGE_ENABLED": "0",
            **{f"STRATA_{name.upper()}_SHUTDOWN_GRACE_S": str(GRACE_S) for name in SERVICES},
        },
    )
    first = running.services["orchestrator"]
    second = ServiceProcess(
        "orchestrator",
        running.run_dir,
        {**first.settings, "DATA_DIR": str(running.run_dir / "orchestrator-b")},
        name="orchestrator-b",
        env=running.env,
    )
    try:
        running.services["orchestrator-b"] = second.start()
        for process in running.services.values():
            pin_port(process)
        yield running
    finally:
        running.stop()


def restart(process: ServiceProcess, *, kill: bool = False) -> None:
    """Stops the process (SIGKILL, or SIGTERM and its grace) and starts it on the same port."""
    assert process.process is not None
    if kill:
        process.process.kill()
        process.process.wait()
    else:
        process.stop(GRACE_S + 5)
    process.start(timeout_s=60)


def slow_stream(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub,
    key: str,
    model: str = "mock-slow-chunks",
    timeout_s: float = 30,
) -> grpc.Call:
    request = orchestrator_pb2.StreamGenerateRequest(
        model=model,
        # mock-slow-chunks: 12 words 200 ms apart, well within the grace.
        params=common_pb2.GenerationParams(max_output_tokens=12),
        messages=[user(f"a slow answer {uuid.uuid4().hex}")],
    )
    return stub.StreamGenerate(request, metadata=bearer(key), timeout=timeout_s)


@pytest.mark.parametrize("victim", ["executor", "orchestrator"])
def test_a_process_killed_mid_stream_fails_the_call_at_once_and_frees_its_reservation(
    victim: str, stack: LocalStack, test_keys: ApiKeys, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    wait_until_nothing_reserved(client, RESERVATION_TTL_S + 5)
    before = usage_record(client).get("requests", 0)
    channel = grpc.insecure_channel(stack.addresses["orchestrator"])
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    process = stack.services[victim]
    try:
        # up-slow: a priced model, 200 chunks 50 ms apart from the fake upstream.
        stream = slow_stream(stub, test_keys.acme, "up-slow")
        chunks = iter(stream)
        assert next(chunks).HasField("start")
        assert next(chunks).HasField("delta")
        assert reserved(client) > 0  # the request holds its reservation while it runs
        assert process.process is not None
        process.process.kill()  # SIGKILL: no drain, no goodbye
        killed_at = time.monotonic()
        with pytest.raises(grpc.RpcError) as failed:
            for _ in chunks:
                pass
        took = time.monotonic() - killed_at
        assert took < 5, f"the client waited {took:.1f}s (its deadline is 30s)"
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, rich_error(failed.value)
        process.process.wait()
        if victim == "executor":
            # The orchestrator settles what the broken stream used.
            assert rich_error(failed.value).reason in {"STREAM_INTERRUPTED", "EXECUTOR_UNAVAILABLE"}
            wait_until_nothing_reserved(client, 5)
        else:
            # Nobody settles: the reservation expires as designed and the sweep frees it.
            wait_until_nothing_reserved(client, RESERVATION_TTL_S + 5 * SWEEP_INTERVAL_S + 3)
        record = usage_record(client)
        assert record.get("requests", 0) == before + 1  # charged once
        assert record.get("spent", 0) > 0
    finally:
        channel.close()
        restart(process)  # respawn on the same port for the next tests
    # And the stack answers again through the channels it already had.
    with grpc.insecure_channel(stack.addresses["orchestrator"]) as again:
        reply = ask_with_retries(
            orchestrator_pb2_grpc.OrchestratorServiceStub(again), test_keys.acme, "after"
        )
    assert reply.finish_reason == common_pb2.FINISH_REASON_STOP


def test_sigterm_turns_health_not_serving_and_lets_open_streams_finish(
    stack: LocalStack, test_keys: ApiKeys
) -> None:
    process = stack.services["orchestrator-b"]
    channel = grpc.insecure_channel(process.address)
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=30)
        statuses = iter(watch)
        assert next(statuses).status == health_pb2.HealthCheckResponse.SERVING
        stream = slow_stream(stub, test_keys.acme)
        chunks = iter(stream)
        received = [next(chunks), next(chunks)]
        assert received[0].HasField("start")
        process.terminate()
        terminated_at = time.monotonic()
        assert next(statuses).status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert time.monotonic() - terminated_at < 1.0
        received += list(chunks)  # the open stream runs to its end
        assert received[-1].HasField("final")
        assert received[-1].final.finish_reason == common_pb2.FINISH_REASON_LENGTH
        assert time.monotonic() - terminated_at < GRACE_S
        assert process.process is not None
        process.process.wait(GRACE_S + 5)
        assert process.process.returncode == 0
        watch.cancel()
    finally:
        channel.close()
        restart(process)


def ask_with_retries(
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub
    | list[orchestrator_pb2_grpc.OrchestratorServiceStub],
    key: str,
    label: str,
    attempts: int = 80,
    pause_s: float = 0.25,
) -> orchestrator_pb2.GenerateResponse:
    """One request, retried with its request id on a retryable error (round-robin over the
    stubs): what a well-behaved client does."""
    stubs = stub if isinstance(stub, list) else [stub]
    request = orchestrator_pb2.GenerateRequest(
        model="mock-fast",
        messages=[user(f"{label} {uuid.uuid4().hex}")],
        request_id=uuid.uuid4().hex,
        cache_policy=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_BYPASS),
    )
    for attempt in range(attempts):
        try:
            return stubs[attempt % len(stubs)].Generate(request, metadata=bearer(key), timeout=10)
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE and rich_error(err).reason != "REQUEST_IN_PROGRESS":
                raise
            time.sleep(pause_s)
    raise AssertionError(f"{request.request_id} still failing after {attempts} attempts")


def test_a_rolling_restart_under_load_loses_no_request(
    stack: LocalStack, test_keys: ApiKeys, redis_url: str
) -> None:
    client = redis.Redis.from_url(redis_url)
    before = usage_record(client).get("requests", 0)
    channels = [
        grpc.insecure_channel(stack.addresses[name]) for name in ("orchestrator", "orchestrator-b")
    ]
    stubs = [orchestrator_pb2_grpc.OrchestratorServiceStub(c) for c in channels]
    stop = threading.Event()
    answers: list[orchestrator_pb2.GenerateResponse] = []
    errors: list[BaseException] = []
    counter = itertools.count()

    def load(worker: int) -> None:
        rotated = stubs[worker % 2 :] + stubs[: worker % 2]
        while not stop.is_set():
            try:
                answers.append(ask_with_retries(rotated, test_keys.acme, f"load {next(counter)}"))
            except BaseException as err:
                errors.append(err)
                return

    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            workers = [pool.submit(load, i) for i in range(4)]
            time.sleep(1)
            for name in ("executor", "cache", "control", "orchestrator", "orchestrator-b"):
                restart(stack.services[name])
                time.sleep(0.5)  # a little steady load between restarts
            stop.set()
            for worker in workers:
                worker.result(timeout=60)
    finally:
        stop.set()
        for channel in channels:
            channel.close()

    assert not errors, errors[0]
    assert len(answers) > 20
    for answer in answers:
        assert answer.finish_reason == common_pb2.FINISH_REASON_STOP
        assert answer.text.startswith("Mock answer")
    request_ids = {a.request_id for a in answers}
    assert len(request_ids) == len(answers)
    # Charged once per request id, however many attempts it took.
    deadline = time.monotonic() + 5
    while usage_record(client).get("requests", 0) != before + len(request_ids):
        assert time.monotonic() < deadline, (usage_record(client), before, len(request_ids))
        time.sleep(0.1)
    wait_until_nothing_reserved(client, RESERVATION_TTL_S + 5)
