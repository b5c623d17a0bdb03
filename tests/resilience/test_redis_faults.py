"""Redis blackholed, paused, killed or cut off, for real, under the four services.

A private `redis-server` (append-only file, fsync always, so a restart keeps the tenants)
on a port picked at run time, with `tests/faultproxy.py` between it and the services: control,
cache and the orchestrator reach Redis only through the proxy. Each test causes the fault
(SIGSTOP/SIGCONT, SIGKILL and a restart on the same port, RST of every connection, a silent
network, latency, 1-byte slices) and checks what a client sees:

- a tenant without budgets is still answered, in bounded time (cache miss, per-process limits
  that still limit);
- a tenant with a budget is refused UNAVAILABLE/BUDGET_UNVERIFIABLE (never free spend);
- once Redis answers again the same services serve normally, with no restart, and what was
  settled meanwhile reaches the ledger.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import yaml
from pydantic import SecretStr
from redis.backoff import NoBackoff
from redis.retry import Retry

from services.cache.app import build as build_cache
from services.cache.settings import CacheSettings
from services.control.app import build as build_control
from services.control.keys import new_key
from services.control.settings import ControlSettings
from services.executor.app import build as build_executor
from services.executor.settings import ExecutorSettings
from services.orchestrator.app import build as build_orchestrator
from services.orchestrator.settings import OrchestratorSettings
from strata.cache.v1 import cache_pb2_grpc
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2_grpc
from strata.executor.v1 import executor_pb2_grpc
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.devstack import PrivateRedis
from tests.faultproxy import Fault, FaultProxy
from tests.grpc.conftest import LOCAL, Served, _stop_control, serve, shutdown
from tests.helpers import bearer, rich_error, usage_record, user

DEGRADED_BOUND_S = 2.0
"""Longest a request may take while Redis does not answer."""
RECOVERY_S = 8.0
"""Longest the services may take to use Redis again once it answers."""


# --- a Redis of our own ----------------------------------------------------------------------


@dataclass
class RedisProcess(PrivateRedis):
    """A durable `redis-server` on a port picked at its first start, that can be paused,
    killed and restarted (on the same port, with its data)."""

    durable: bool = True
    paused: bool = False

    def start(self, timeout_s: float = 10.0) -> RedisProcess:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        super().start(timeout_s)
        return self

    def pause(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.process is not None and self.paused:
            self.process.send_signal(signal.SIGCONT)
            self.paused = False

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(5)

    def ensure_running(self) -> None:
        self.resume()
        if self.process is None or self.process.poll() is not None:
            self.start()

    def stop(self) -> None:
        self.resume()
        super().stop()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path_factory.mktemp("redis-faults"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def proxy(redis_server: RedisProcess) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", redis_server.port) as running:
        yield running


# --- tenants: one without budgets, one with ---------------------------------------------------


@dataclass(frozen=True)
class Keys:
    open: str
    """open/open-main: no budget, 1000 requests per minute."""
    tight: str
    """open/open-tight: no budget, 3 requests per minute."""
    metered: str
    """metered/metered-main: the tenant has a day budget."""


@pytest.fixture(scope="module")
def keys_and_tenants(tmp_path_factory: pytest.TempPathFactory) -> tuple[Keys, Path]:
    made = {name: new_key() for name in ("open", "tight", "metered")}
    tenants = {
        "tenants": {
            "open": {
                "keys": [
                    {"id": "open-main", "sha256": made["open"][1], "requests_per_minute": 1000},
                    {"id": "open-tight", "sha256": made["tight"][1], "requests_per_minute": 3},
                ]
            },
            "metered": {
                "budgets": {"day_usd": "5"},
                "keys": [{"id": "metered-main", "sha256": made["metered"][1]}],
            },
        }
    }
    path = tmp_path_factory.mktemp("faults-config") / "tenants.yaml"
    path.write_text(yaml.safe_dump(tenants))
    return Keys(**{name: key for name, (key, _) in made.items()}), path


@pytest.fixture(scope="module")
def keys(keys_and_tenants: tuple[Keys, Path]) -> Keys:
    return keys_and_tenants[0]


# --- the services, on Redis through the proxy -------------------------------------------------


@dataclass
class Stack:
    control: Served
    cache: Served
    executor: Served
    orchestrator: Served
    direct: redis.Redis
    """A client of the Redis itself (not through the proxy), to read the ledger."""

    async def generate(
        self, key: str, text: str | None = None
    ) -> orchestrator_pb2.GenerateResponse:
        return await self.orchestrator.stub.Generate(
            orchestrator_pb2.GenerateRequest(
                model="mock-fast", messages=[user(text or f"question {uuid.uuid4().hex}")]
            ),
            metadata=bearer(key),
            timeout=10,
        )

    async def timed(self, key: str) -> tuple[orchestrator_pb2.GenerateResponse, float]:
        started = time.monotonic()
        reply = await self.generate(key)
        return reply, time.monotonic() - started

    async def refused(self, key: str) -> tuple[grpc.StatusCode, str, float]:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.generate(key)
        error = rich_error(caught.value)
        return error.code, error.reason, time.monotonic() - started

    async def recovered(self, key: str) -> orchestrator_pb2.GenerateResponse:
        """The first answer for `key` once admission and the cache use Redis again (each
        skips Redis for up to a second after it kept failing)."""
        deadline = time.monotonic() + RECOVERY_S
        while True:
            try:
                reply = await self.generate(key)
                if reply.cache_status != common_pb2.CACHE_STATUS_ERROR:
                    return reply
            except grpc.aio.AioRpcError as err:
                assert rich_error(err).reason in ("BUDGET_UNVERIFIABLE", "REDIS_UNAVAILABLE")
            assert time.monotonic() < deadline, "the services did not use Redis again"
            await asyncio.sleep(0.1)


@pytest.fixture
async def stack(
    redis_server: RedisProcess,
    proxy: FaultProxy,
    keys_and_tenants: tuple[Keys, Path],
    models_file: Path,
    guardrails_file: Path,
    tmp_path: Path,
) -> AsyncIterator[Stack]:
    redis_server.ensure_running()
    proxy.clear()
    direct = redis.Redis.from_url(redis_server.url)
    direct.flushall()
    through_proxy = f"redis://127.0.0.1:{proxy.port}/0"
    started: list[Served] = []
    control = cache = None
    try:
        control_settings = ControlSettings(
            redis_url=through_proxy,
            tenants_file=keys_and_tenants[1],
            models_file=models_file,
            guardrails_file=guardrails_file,
            admin_token=SecretStr("faults-admin"),
            sweep_interval_s=0.2,
            **LOCAL,
        )
        control = await serve(
            control_settings,
            await build_control(control_settings),
            control_pb2_grpc.ControlServiceStub,
        )
        cache_settings = CacheSettings(
            redis_url=through_proxy, data_dir=tmp_path / "cache", **LOCAL
        )
        cache = await serve(
            cache_settings, await build_cache(cache_settings), cache_pb2_grpc.CacheServiceStub
        )
        started.append(cache)
        executor_settings = ExecutorSettings(models_file=models_file, **LOCAL)
        executor = await serve(
            executor_settings,
            await build_executor(executor_settings),
            executor_pb2_grpc.ExecutorServiceStub,
        )
        started.append(executor)
        orchestrator_settings = OrchestratorSettings(
            control_address=control.address,
            cache_address=cache.address,
            executor_address=executor.address,
            models_file=models_file,
            guardrails_file=guardrails_file,
            redis_url=through_proxy,
            data_dir=tmp_path / "orchestrator",
            **LOCAL,
        )
        orchestrator = await serve(
            orchestrator_settings,
            await build_orchestrator(orchestrator_settings),
            orchestrator_pb2_grpc.OrchestratorServiceStub,
        )
        started.append(orchestrator)
        yield Stack(control, cache, executor, orchestrator, direct)
    finally:
        # Let Redis answer again first, so nothing waits on it while stopping.
        proxy.clear()
        redis_server.ensure_running()
        for served in reversed(started):
            await shutdown(served)
        if control is not None:
            await _stop_control(control)
        direct.close()


async def warm_up(stack: Stack, *keys: str) -> None:
    """One normal request per key: control now knows each key and its tenant's policy."""
    for key in keys:
        reply = await stack.generate(key)
        assert reply.cache_status == common_pb2.CACHE_STATUS_MISS


async def assert_degraded(stack: Stack, keys: Keys) -> None:
    """What clients see while Redis does not answer."""
    reply, took = await stack.timed(keys.open)
    assert reply.text.startswith("Mock answer")
    assert reply.cache_status == common_pb2.CACHE_STATUS_ERROR  # a miss, not an error
    assert took < DEGRADED_BOUND_S
    code, reason, took = await stack.refused(keys.metered)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "BUDGET_UNVERIFIABLE")
    assert took < DEGRADED_BOUND_S


def requests_counted(stack: Stack, tenant: str, key_id: str) -> int:
    return usage_record(stack.direct, tenant, key_id).get("requests", 0)


async def eventually_counted(stack: Stack, tenant: str, key_id: str, expected: int) -> None:
    deadline = time.monotonic() + RECOVERY_S
    while requests_counted(stack, tenant, key_id) < expected:
        assert time.monotonic() < deadline, usage_record(stack.direct, tenant, key_id)
        await asyncio.sleep(0.1)
    assert requests_counted(stack, tenant, key_id) == expected


# --- the faults --------------------------------------------------------------------------------


async def test_blackholed_redis_degrades_then_recovers(
    stack: Stack, proxy: FaultProxy, keys: Keys
) -> None:
    await warm_up(stack, keys.open, keys.tight, keys.metered)
    proxy.set_fault(Fault.BLACKHOLE)

    await assert_degraded(stack, keys)
    # The per-process limiter still limits: 3 a minute for open-tight, then RATE_LIMITED.
    for _ in range(3):
        reply, took = await stack.timed(keys.tight)
        assert took < DEGRADED_BOUND_S
    code, reason, took = await stack.refused(keys.tight)
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert took < DEGRADED_BOUND_S
    # Once the outage is known, requests do not even wait for Redis.
    _, took = await stack.timed(keys.open)
    assert took < 0.5

    proxy.clear()
    reply = await stack.recovered(keys.metered)
    assert reply.text.startswith("Mock answer")
    # Admission is Redis's again: open-tight already used 1 of its 3 there.
    await stack.generate(keys.tight)
    await stack.generate(keys.tight)
    code, reason, _ = await stack.refused(keys.tight)
    assert reason == "RATE_LIMITED"


async def test_paused_redis_recovers_and_settles_what_ran_meanwhile(
    stack: Stack, redis_server: RedisProcess, keys: Keys
) -> None:
    await warm_up(stack, keys.open, keys.metered)
    await eventually_counted(stack, "open", "open-main", 1)
    redis_server.pause()

    await assert_degraded(stack, keys)
    reply = await stack.generate(keys.open)
    assert reply.cache_status == common_pb2.CACHE_STATUS_ERROR

    redis_server.resume()
    await stack.recovered(keys.metered)
    # The two requests answered during the pause were settled once Redis came back.
    await eventually_counted(stack, "open", "open-main", 3)
    reply = await stack.generate(keys.open)
    assert reply.cache_status == common_pb2.CACHE_STATUS_MISS


async def test_killed_redis_restarted_on_the_same_port(
    stack: Stack, redis_server: RedisProcess, keys: Keys
) -> None:
    await warm_up(stack, keys.open, keys.metered)
    redis_server.kill()

    await assert_degraded(stack, keys)

    redis_server.start()
    reply = await stack.recovered(keys.metered)
    assert reply.text.startswith("Mock answer")
    text = f"asked twice {uuid.uuid4().hex}"
    first = await stack.generate(keys.open, text)
    again = await stack.generate(keys.open, text)
    assert (first.cache_status, again.cache_status) == (
        common_pb2.CACHE_STATUS_MISS,
        common_pb2.CACHE_STATUS_HIT,
    )


async def test_reset_connections(stack: Stack, proxy: FaultProxy, keys: Keys) -> None:
    await warm_up(stack, keys.open, keys.metered)
    # Every pooled connection cut with an RST, and the path is back at once: the next calls
    # reconnect and are answered, the budgeted tenant included (no degraded answer). A
    # service may meet more than one dead pooled connection in one call: the cache may then
    # miss once (ERROR, served as a miss); by the last call every pool is whole again.
    proxy.set_fault(Fault.RESET)
    proxy.clear()
    statuses = [(await stack.generate(key)).cache_status for key in (keys.metered, keys.open)]
    assert set(statuses) <= {common_pb2.CACHE_STATUS_MISS, common_pb2.CACHE_STATUS_ERROR}
    reply = await stack.generate(keys.metered)
    assert reply.cache_status == common_pb2.CACHE_STATUS_MISS

    # Resets that go on (each new connection too): degraded, then back.
    proxy.set_fault(Fault.RESET)
    await assert_degraded(stack, keys)
    proxy.clear()
    await stack.recovered(keys.metered)


async def test_redis_out_of_memory_degrades_then_settles_what_ran_meanwhile(
    stack: Stack, keys: Keys
) -> None:
    """Redis up but refusing writes (`maxmemory` reached under `noeviction`: OOM errors):
    served as an outage, not as internal errors. A tenant without budgets is answered, one
    with a budget is refused BUDGET_UNVERIFIABLE; once Redis has room again, what ran
    meanwhile is settled."""
    await warm_up(stack, keys.open, keys.metered)
    await eventually_counted(stack, "open", "open-main", 1)
    memory = stack.direct.info("memory")
    stack.direct.config_set("maxmemory-policy", "noeviction")
    stack.direct.config_set("maxmemory", memory["used_memory"] + 1024)
    try:
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            for n in range(100):
                stack.direct.set(f"filler:{n}", "x" * 4096)
        for _ in range(2):
            reply, took = await stack.timed(keys.open)
            assert reply.text.startswith("Mock answer")
            assert took < DEGRADED_BOUND_S
        code, reason, took = await stack.refused(keys.metered)
        assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "BUDGET_UNVERIFIABLE")
        assert requests_counted(stack, "open", "open-main") == 1
    finally:
        stack.direct.config_set("maxmemory", 0)
    await stack.recovered(keys.metered)
    await eventually_counted(stack, "open", "open-main", 3)


async def test_slow_and_sliced_redis(stack: Stack, proxy: FaultProxy, keys: Keys) -> None:
    await warm_up(stack, keys.open, keys.metered)
    # Bytes one at a time, or a little late: still Redis's answers, budgets included.
    proxy.set_fault(Fault.SLICE, slice_bytes=1)
    reply = await stack.generate(keys.metered)
    assert reply.cache_status == common_pb2.CACHE_STATUS_MISS
    proxy.set_fault(Fault.LATENCY, latency_s=0.02)
    reply = await stack.generate(keys.metered)
    assert reply.cache_status == common_pb2.CACHE_STATUS_MISS
    # Later than the Redis timeout: every call is cut at its bound, as if Redis were gone.
    proxy.set_fault(Fault.LATENCY, latency_s=1.0)
    await assert_degraded(stack, keys)
    proxy.clear()
    await stack.recovered(keys.metered)


def test_the_proxy_itself(redis_server: RedisProcess) -> None:
    """Pass-through, blackhole (a read times out), reset (the connection is reset)."""
    with FaultProxy("127.0.0.1", redis_server.port) as proxy:
        client = redis.Redis(
            port=proxy.port, socket_timeout=0.2, retry=Retry(NoBackoff(), retries=0)
        )
        assert client.ping()
        proxy.set_fault(Fault.BLACKHOLE)
        with pytest.raises(redis.TimeoutError):
            client.ping()
        proxy.set_fault(Fault.RESET)
        with pytest.raises(redis.ConnectionError):
            client.ping()
        proxy.clear()
        assert client.ping()
        client.close()
