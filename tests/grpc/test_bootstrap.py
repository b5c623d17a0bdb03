"""The shared bootstrap: health follows the dependencies, reflection, graceful drain."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.common.bootstrap import Service, start
from services.common.settings import ServiceSettings
from services.executor.app import build as build_executor
from services.executor.settings import ExecutorSettings
from strata.common.v1 import common_pb2
from strata.executor.v1 import executor_pb2, executor_pb2_grpc
from tests.helpers import user

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def test_health_is_not_serving_until_dependencies_answer() -> None:
    dependency_up = asyncio.Event()

    async def probe() -> None:
        if not dependency_up.is_set():
            raise ConnectionError("not yet")

    service = Service(
        name="probe-test",
        register=lambda server: None,
        service_names=["strata.test.v1.ProbeService"],
        probes={"dependency": probe},
    )
    running = await start(ServiceSettings(port=0, health_probe_interval_s=0.05), service)
    channel = grpc.aio.insecure_channel(running.address)
    health = health_pb2_grpc.HealthStub(channel)
    try:
        watch = health.Watch(health_pb2.HealthCheckRequest(service="strata.test.v1.ProbeService"))
        assert (await watch.read()).status == NOT_SERVING
        dependency_up.set()
        async with asyncio.timeout(5):
            assert (await watch.read()).status == SERVING
        dependency_up.clear()
        async with asyncio.timeout(5):
            assert (await watch.read()).status == NOT_SERVING
        watch.cancel()
    finally:
        await channel.close()
        await running.stop(0)


async def test_reflection_lists_the_service(tmp_path: Path) -> None:
    settings = _executor_settings(tmp_path)
    running = await start(settings, await build_executor(settings))
    channel = grpc.aio.insecure_channel(running.address)
    try:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        reply = await replies.read()
        names = {s.name for s in reply.list_services_response.service}
        assert "strata.executor.v1.ExecutorService" in names
        assert "grpc.health.v1.Health" in names
    finally:
        await channel.close()
        await running.stop(0)


async def test_stop_lets_open_streams_finish_and_refuses_new_calls(tmp_path: Path) -> None:
    settings = _executor_settings(tmp_path)
    running = await start(settings, await build_executor(settings))
    channel = grpc.aio.insecure_channel(running.address)
    stub = executor_pb2_grpc.ExecutorServiceStub(channel)
    request = executor_pb2.StreamCompleteRequest(
        request_id="drain", model="drain-me", messages=[user("a long answer please")]
    )
    try:
        call = stub.StreamComplete(request, timeout=20)
        assert (await call.read()).HasField("start")
        stopping = asyncio.create_task(running.stop(10))
        rest = []
        while (chunk := await call.read()) is not grpc.aio.EOF:
            rest.append(chunk)
        assert rest[-1].HasField("final")
        assert rest[-1].final.finish_reason == common_pb2.FINISH_REASON_STOP
        await stopping
        async with asyncio.timeout(5):
            try:
                await stub.ListModels(executor_pb2.ListModelsRequest(), timeout=1)
                raise AssertionError("a stopped server answered")
            except grpc.aio.AioRpcError as err:
                assert err.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
    finally:
        await channel.close()
        await running.stop(0)


def _executor_settings(tmp_path: Path) -> ExecutorSettings:
    models = {
        "providers": {"mock": {"kind": "mock"}},
        "models": {
            "drain-me": {
                "provider": "mock",
                "upstream_model": "echo",
                "options": {"chunk_delay_ms": 15},
            }
        },
    }
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(models))
    return ExecutorSettings(models_file=path, host="127.0.0.1", port=0)
