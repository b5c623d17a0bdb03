"""Each service built by the same `serve` bootstrap as production, on 127.0.0.1:0, in-process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

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
from strata.control.v1 import control_pb2_grpc
from strata.executor.v1 import executor_pb2_grpc
from strata.orchestrator.v1 import orchestrator_pb2_grpc

LOCAL: dict[str, Any] = {"host": "127.0.0.1", "port": 0}


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
    server = await start(settings, service)
    channel = grpc.aio.insecure_channel(server.address)
    return Served(server, channel, stub_class(channel))


async def shutdown(served: Served) -> None:
    await served.channel.close()
    await served.server.stop(0)


@pytest.fixture
async def control(
    redis_db: redis.Redis, redis_url: str, tenants_file: Path
) -> AsyncIterator[Served]:
    settings = ControlSettings(redis_url=redis_url, tenants_file=tenants_file, **LOCAL)
    served = await serve(
        settings, await build_control(settings), control_pb2_grpc.ControlServiceStub
    )
    yield served
    await shutdown(served)


@pytest.fixture
async def cache(redis_db: redis.Redis, redis_url: str) -> AsyncIterator[Served]:
    settings = CacheSettings(redis_url=redis_url, **LOCAL)
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


@pytest.fixture
async def orchestrator(
    control: Served, cache: Served, executor: Served, models_file: Path
) -> AsyncIterator[Served]:
    settings = OrchestratorSettings(
        control_address=control.address,
        cache_address=cache.address,
        executor_address=executor.address,
        models_file=models_file,
        **LOCAL,
    )
    served = await serve(
        settings, await build_orchestrator(settings), orchestrator_pb2_grpc.OrchestratorServiceStub
    )
    yield served
    await shutdown(served)
