"""Each service built by the same `serve` bootstrap as production, on 127.0.0.1:0, in-process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import SecretStr

from services.cache.app import build as build_cache
from services.cache.settings import CacheSettings
from services.common.bootstrap import RunningServer, Service, start
from services.common.settings import ServiceSettings
from services.control.app import build as build_control
from services.control.settings import ControlSettings
from services.executor.app import build as build_executor
from services.executor.settings import ExecutorSettings
from services.orchestrator.app import build as build_orchestrator
from services.orchestrator.settings import OrchestratorSettings
from strata.cache.v1 import cache_pb2_grpc
from strata.control.v1 import admin_pb2_grpc, control_pb2_grpc
from strata.executor.v1 import executor_pb2_grpc
from strata.orchestrator.v1 import orchestrator_pb2_grpc

LOCAL: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
IN_PROCESS: dict[str, Any] = {**LOCAL, "redis_timeout_s": 1.0}
"""Settings of the services these fixtures run in the test's process. There the four
services and the test share one event loop: one's burst of CPU (an embedding, a
collection) delays another's Redis replies, on a busy machine past the 0.25 s meant for a
process of its own."""
ADMIN_TOKEN = "test-admin-token"


@dataclass
class Served:
    """A running service and a channel to it."""

    server: RunningServer
    channel: grpc.aio.Channel
    stub: Any

    @property
    def address(self) -> str:
        return self.server.address


async def serve(settings: ServiceSettings, service: Service, stub_class: type) -> Served:
    """Starts the service and waits until its health check says SERVING."""
    server = await start(settings, service)
    channel = grpc.aio.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(10):
        async for reply in health.Watch(health_pb2.HealthCheckRequest()):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break
    return Served(server, channel, stub_class(channel))


async def shutdown(served: Served) -> None:
    await served.channel.close()
    await served.server.stop(0)


@pytest.fixture
async def control(
    redis_db: redis.Redis,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
    guardrails_file: Path,
) -> AsyncIterator[Served]:
    settings = ControlSettings(
        redis_url=redis_url,
        tenants_file=tenants_file,
        models_file=models_file,
        guardrails_file=guardrails_file,
        admin_token=SecretStr(ADMIN_TOKEN),
        sweep_interval_s=0.2,
        **IN_PROCESS,
    )
    served = await serve(
        settings, await build_control(settings), control_pb2_grpc.ControlServiceStub
    )
    yield served
    await shutdown(served)


@pytest.fixture
async def cache(redis_db: redis.Redis, redis_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    settings = CacheSettings(
        redis_url=redis_url,
        data_dir=tmp_path / "cache",
        admin_token=SecretStr(ADMIN_TOKEN),
        **IN_PROCESS,
    )
    served = await serve(settings, await build_cache(settings), cache_pb2_grpc.CacheServiceStub)
    yield served
    await shutdown(served)


@pytest.fixture
async def executor(models_file: Path) -> AsyncIterator[Served]:
    settings = ExecutorSettings(models_file=models_file, **LOCAL)
    served = await serve(
        settings, await build_executor(settings), executor_pb2_grpc.ExecutorServiceStub
    )
    yield served
    await shutdown(served)


StartOrchestrator = Callable[..., Awaitable[Served]]
"""Starts an orchestrator on the test services: `await start_orchestrator(**settings)`."""


@pytest.fixture
async def start_orchestrator(
    control: Served,
    cache: Served,
    executor: Served,
    models_file: Path,
    guardrails_file: Path,
    redis_url: str,
    tmp_path: Path,
) -> AsyncIterator[StartOrchestrator]:
    """A factory of orchestrators on the test control, cache and executor (stopped at the
    end of the test): the `orchestrator` fixture's settings unless overridden, e.g.
    `routes_file=..., pipelines_file=..., role="api"`."""
    started: list[Served] = []

    async def start_one(**overrides: Any) -> Served:
        options: dict[str, Any] = {
            "control_address": control.address,
            "cache_address": cache.address,
            "executor_address": executor.address,
            "models_file": models_file,
            "guardrails_file": guardrails_file,
            "redis_url": redis_url,
            "data_dir": tmp_path / f"orchestrator-{len(started)}",
            "cache_admin_token": ADMIN_TOKEN,
            **IN_PROCESS,
            **overrides,
        }
        settings = OrchestratorSettings(**options)
        served = await serve(
            settings,
            await build_orchestrator(settings),
            orchestrator_pb2_grpc.OrchestratorServiceStub,
        )
        started.append(served)
        return served

    yield start_one
    for served in reversed(started):
        await shutdown(served)


@pytest.fixture
async def orchestrator(start_orchestrator: StartOrchestrator) -> Served:
    """An orchestrator with the default settings (no routes, no pipelines)."""
    return await start_orchestrator()


StartControl = Callable[..., Awaitable[Served]]
"""Starts a control server: `await start_control(tenants_file, **ControlSettings fields)`."""


@pytest.fixture
async def start_control(
    redis_db: redis.Redis, redis_url: str, models_file: Path, guardrails_file: Path
) -> AsyncIterator[StartControl]:
    """A factory of control servers on the test Redis (stopped at the end of the test):
    the `control` fixture's settings unless overridden, e.g. `tenants_file=...,
    models_file=..., reservation_ttl_s=1, admin_token=None`."""
    started: list[Served] = []

    async def start_one(tenants_file: Path | None = None, **overrides: Any) -> Served:
        options: dict[str, Any] = {
            "redis_url": redis_url,
            "tenants_file": tenants_file,
            "models_file": models_file,
            "guardrails_file": guardrails_file,
            "admin_token": ADMIN_TOKEN,
            "sweep_interval_s": 0.2,
            **IN_PROCESS,
            **overrides,
        }
        settings = ControlSettings(**options)
        served = await serve(
            settings, await build_control(settings), control_pb2_grpc.ControlServiceStub
        )
        started.append(served)
        return served

    yield start_one
    for served in reversed(started):
        await _stop_control(served)


async def _stop_control(served: Served) -> None:
    """`shutdown`, re-cancelling any task that swallowed its cancellation: on Python 3.11
    `asyncio.wait_for` (used by redis-py) can swallow a cancel that lands as the awaited
    operation completes, and control's `close()` would then wait for its sweeper forever."""
    await served.channel.close()
    stopping = asyncio.ensure_future(served.server.stop(0))
    async with asyncio.timeout(10):
        while not stopping.done():
            await asyncio.wait({stopping}, timeout=0.2)
            for task in asyncio.all_tasks():
                if task.cancelling() and not task.done():
                    task.cancel()
    await stopping


@pytest.fixture
async def admin_control(start_control: StartControl, tenants_file: Path) -> Served:
    """A control server like `control` (the test tenants, admin token ADMIN_TOKEN), stopped
    by `start_control`."""
    return await start_control(tenants_file)


@pytest.fixture
def admin(admin_control: Served) -> Any:
    """A ControlAdminService stub on `admin_control`'s channel (pass the metadata
    `bearer(ADMIN_TOKEN)` from tests.helpers)."""
    return admin_pb2_grpc.ControlAdminServiceStub(admin_control.channel)
