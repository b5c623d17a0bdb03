"""Overload: a bounded number of calls per process, refused at once past it (batch first),
flat memory under a burst, bounded messages, and the channel's retry of idempotent calls."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.calls import open_channel
from services.common.limits import InflightLimit
from services.executor.app import build as build_executor
from services.executor.settings import ExecutorSettings
from strata.cache.v1 import cache_pb2, cache_pb2_grpc
from strata.common.v1 import common_pb2
from strata.executor.v1 import executor_pb2, executor_pb2_grpc
from strata.orchestrator.v1 import orchestrator_pb2
from tests.conftest import ApiKeys
from tests.grpc.conftest import (  # noqa: F401 - fixtures used by the batch test
    LOCAL,
    Served,
    StartOrchestrator,
    cache,
    control,
    executor,
    serve,
    shutdown,
    start_orchestrator,
)
from tests.helpers import bearer, rich_error, user


@pytest.fixture
async def small_executor(models_file: Path) -> AsyncIterator[Served]:
    """An executor that runs at most 4 calls at once, with 64 KiB messages."""
    settings = ExecutorSettings(
        models_file=models_file, max_inflight=4, max_message_bytes=64 * 1024, **LOCAL
    )
    served = await serve(
        settings, await build_executor(settings), executor_pb2_grpc.ExecutorServiceStub
    )
    yield served
    await shutdown(served)


def slots(served: Served) -> InflightLimit:
    assert served.server.inflight is not None
    return served.server.inflight


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


def hang(stub: Any) -> Any:
    """A StreamComplete that never sends a word (the mock's `hang`), until cancelled."""
    return stub.StreamComplete(
        executor_pb2.StreamCompleteRequest(
            request_id=uuid.uuid4().hex, model="mock-hang", messages=[user("wait")]
        ),
        timeout=30,
    )


async def refused(call: Any) -> Any:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return rich_error(caught.value)


async def test_past_the_bound_a_call_is_refused_at_once_and_slots_come_back(
    small_executor: Served,
) -> None:
    stub = small_executor.stub
    held = [hang(stub) for _ in range(4)]
    await until(lambda: slots(small_executor).inflight == 4)

    began = time.monotonic()
    error = await refused(stub.ListModels(executor_pb2.ListModelsRequest(), timeout=5))
    assert time.monotonic() - began < 0.5
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
    assert error.retry_delay_s == 1.0 and error.metadata["limit_value"] == "4"
    error = await refused(hang(stub).read())
    assert error.reason == "OVERLOADED"
    # Health is never counted: probes answer while the process is full.
    reply = await health_pb2_grpc.HealthStub(small_executor.channel).Check(
        health_pb2.HealthCheckRequest(), timeout=5
    )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # Streams count until they end, however they end.
    for call in held:
        call.cancel()
    await until(lambda: slots(small_executor).inflight == 0)
    assert (await stub.ListModels(executor_pb2.ListModelsRequest(), timeout=5)).models


async def test_batch_is_refused_before_interactive(
    start_orchestrator: StartOrchestrator,  # noqa: F811 - the imported fixture
    test_keys: ApiKeys,
) -> None:
    orchestrator = await start_orchestrator(max_inflight=5, batch_share=0.8)
    stub = orchestrator.stub

    def ask(priority: common_pb2.Priority) -> Any:
        return stub.StreamGenerate(
            orchestrator_pb2.StreamGenerateRequest(
                model="mock-hang",
                messages=[user(f"question {uuid.uuid4().hex}")],
                priority=priority,
            ),
            metadata=bearer(test_keys.acme),
            timeout=30,
        )

    held = [ask(common_pb2.PRIORITY_INTERACTIVE) for _ in range(4)]
    try:
        await until(lambda: slots(orchestrator).inflight == 4)
        # 4 of 5 slots taken: batch (80 %, 4 slots) is refused, interactive still gets in.
        error = await refused(ask(common_pb2.PRIORITY_BATCH).read())
        assert (error.reason, error.metadata["priority"]) == ("OVERLOADED", "batch")
        assert error.retry_delay_s == 1.0
        held.append(ask(common_pb2.PRIORITY_INTERACTIVE))
        await until(lambda: slots(orchestrator).inflight == 5)
        error = await refused(ask(common_pb2.PRIORITY_INTERACTIVE).read())
        assert (error.reason, error.metadata["priority"]) == ("OVERLOADED", "interactive")
    finally:
        for call in held:
            call.cancel()
    # Every slot comes back at once, long before the calls' deadline, wherever each handler
    # was when its client cancelled (a cancel that landed as a Redis command was written
    # used to be lost: tests/unit/test_redis_pool.py).
    await until(lambda: slots(orchestrator).inflight == 0)


def rss_bytes() -> int:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


async def test_memory_stays_flat_under_a_tenfold_burst(small_executor: Served) -> None:
    stub = small_executor.stub
    request = executor_pb2.ListModelsRequest()

    async def burst(calls: int, concurrency: int) -> dict[str, int]:
        outcomes: dict[str, int] = {}
        queue = iter(range(calls))

        async def worker() -> None:
            for _ in queue:
                try:
                    await stub.ListModels(request, timeout=5)
                    outcome = "ok"
                except grpc.aio.AioRpcError as err:
                    outcome = rich_error(err).reason or err.code().name
                outcomes[outcome] = outcomes.get(outcome, 0) + 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return outcomes

    await burst(200, 40)  # warm-up: channels, caches, allocator arenas
    before = rss_bytes()
    held = [hang(stub) for _ in range(4)]
    await until(lambda: slots(small_executor).inflight == 4)
    # Ten times the bound at once, all refused...
    assert await burst(2000, 40) == {"OVERLOADED": 2000}
    for call in held:
        call.cancel()
    await until(lambda: slots(small_executor).inflight == 0)
    # ...then ten times the bound again with the slots free: some run, the rest are refused.
    outcomes = await burst(2000, 40)
    assert set(outcomes) <= {"ok", "OVERLOADED"} and outcomes.get("ok", 0) > 0
    growth = rss_bytes() - before
    assert growth < 30 * 1024 * 1024, f"RSS grew by {growth / 2**20:.1f} MiB"
    assert slots(small_executor).inflight == 0


async def test_a_message_past_the_bound_is_refused(small_executor: Served) -> None:
    # A client that would send anything; the server takes at most 64 KiB.
    channel = grpc.aio.insecure_channel(
        small_executor.address, options=[("grpc.max_send_message_length", 1 << 24)]
    )
    async with channel:
        stub = executor_pb2_grpc.ExecutorServiceStub(channel)
        call = stub.StreamComplete(
            executor_pb2.StreamCompleteRequest(
                request_id="big", model="mock-fast", messages=[user("x" * 100_000)]
            ),
            timeout=5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call.read()
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert slots(small_executor).inflight == 0


# --- the channel's retry policy -----------------------------------------------------------


class FlakyCache(cache_pb2_grpc.CacheServiceServicer):
    """Fails each method's first call with UNAVAILABLE, then answers."""

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    async def _first_fails(self, method: str, context: Any) -> None:
        self.attempts[method] = self.attempts.get(method, 0) + 1
        if self.attempts[method] == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")

    async def Lookup(self, request: Any, context: Any) -> cache_pb2.LookupResponse:
        await self._first_fails("Lookup", context)
        return cache_pb2.LookupResponse()

    async def Store(self, request: Any, context: Any) -> cache_pb2.StoreResponse:
        await self._first_fails("Store", context)
        return cache_pb2.StoreResponse()


class FlakyExecutor(executor_pb2_grpc.ExecutorServiceServicer):
    def __init__(self) -> None:
        self.attempts = 0

    async def StreamComplete(self, request: Any, context: Any) -> AsyncIterator[Any]:
        self.attempts += 1
        if self.attempts == 1:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up")
        yield executor_pb2.StreamCompleteResponse()


@contextlib.asynccontextmanager
async def flaky_server() -> AsyncIterator[tuple[str, FlakyCache, FlakyExecutor]]:
    server = grpc.aio.server()
    cache_servicer, executor_servicer = FlakyCache(), FlakyExecutor()
    cache_pb2_grpc.add_CacheServiceServicer_to_server(cache_servicer, server)
    executor_pb2_grpc.add_ExecutorServiceServicer_to_server(executor_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", cache_servicer, executor_servicer
    finally:
        await server.stop(0)


async def test_the_channel_retries_unavailable_only_for_idempotent_calls() -> None:
    async with flaky_server() as (address, cache_servicer, executor_servicer):
        channel = open_channel(address)
        async with channel:
            cache = cache_pb2_grpc.CacheServiceStub(channel)
            # Lookup is a read: retried transparently, the caller sees the answer.
            await cache.Lookup(cache_pb2.LookupRequest(), timeout=5)
            assert cache_servicer.attempts["Lookup"] == 2
            # Store is not in the idempotent list: the caller sees the failure.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await cache.Store(cache_pb2.StoreRequest(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert cache_servicer.attempts["Store"] == 1
            # A stream of generated text is never retried by the channel.
            executor = executor_pb2_grpc.ExecutorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await executor.StreamComplete(
                    executor_pb2.StreamCompleteRequest(), timeout=5
                ).read()
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert executor_servicer.attempts == 1
