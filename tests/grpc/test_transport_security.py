"""Service-to-service trust: the internal token, and mutual TLS with certificates made here."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import AsyncIterator
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
from services.common.calls import open_channel
from services.common.security import INTERNAL_TOKEN_KEY, Trust, server_trust
from services.common.settings import ServiceSettings
from services.control.app import build as build_control
from services.control.settings import ControlSettings
from services.executor.app import build as build_executor
from services.executor.settings import ExecutorSettings
from services.orchestrator.app import build as build_orchestrator
from services.orchestrator.settings import OrchestratorSettings
from strata.cache.v1 import cache_pb2, cache_pb2_grpc
from strata.control.v1 import control_pb2, control_pb2_grpc
from strata.executor.v1 import executor_pb2, executor_pb2_grpc
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.conftest import ApiKeys
from tests.grpc.conftest import ADMIN_TOKEN, LOCAL
from tests.helpers import bearer, rich_error, user

TOKEN = "test-internal-token"


def make_certs(directory: Path, name: str = "service") -> dict[str, Any]:
    """A CA and one certificate it signed, for server and client use (as `make certs`)."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    cert, key = directory / f"{name}.pem", directory / f"{name}-key.pem"
    csr, ext = directory / f"{name}.csr", directory / f"{name}.ext"
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=CA:FALSE\n"
    )
    ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2"
    commands = [
        f"req -x509 {ec} -subj /CN={directory.name}-CA -keyout {ca_key} -out {ca}",
        f"req {ec} -subj /CN={name} -keyout {key} -out {csr}",
        f"x509 -req -in {csr} -CA {ca} -CAkey {ca_key} -CAcreateserial -days 2"
        f" -extfile {ext} -out {cert}",
    ]
    for command in commands:
        subprocess.run(["openssl", *command.split()], check=True, capture_output=True)
    return {"tls_cert_file": cert, "tls_key_file": key, "tls_ca_file": ca}


async def wait_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    async with asyncio.timeout(10):
        while True:
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                reply = None
            if reply is not None and reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            await asyncio.sleep(0.05)


class Stack:
    """Services started by a test, each stopped at its end."""

    def __init__(self) -> None:
        self.servers: list[RunningServer] = []
        self.channels: list[grpc.aio.Channel] = []

    async def start(self, settings: ServiceSettings, service: Service) -> RunningServer:
        server = await start(settings, service)
        self.servers.append(server)
        channel = self.channel(server.address, server_trust(settings, service.name)[0])
        await wait_serving(channel)
        return server

    def channel(self, address: str, trust: Trust | None = None) -> grpc.aio.Channel:
        channel = open_channel(address, trust=trust)
        self.channels.append(channel)
        return channel

    async def start_all(
        self,
        redis_url: str,
        tenants_file: Path,
        models_file: Path,
        guardrails_file: Path,
        data_dir: Path,
        **trust: Any,
    ) -> dict[str, RunningServer]:
        control = ControlSettings(
            redis_url=redis_url,
            tenants_file=tenants_file,
            models_file=models_file,
            guardrails_file=guardrails_file,
            admin_token=SecretStr(ADMIN_TOKEN),
            **trust,
            **LOCAL,
        )
        cache = CacheSettings(redis_url=redis_url, data_dir=data_dir / "cache", **trust, **LOCAL)
        executor = ExecutorSettings(models_file=models_file, **trust, **LOCAL)
        servers = {
            "control": await self.start(control, await build_control(control)),
            "cache": await self.start(cache, await build_cache(cache)),
            "executor": await self.start(executor, await build_executor(executor)),
        }
        orchestrator = OrchestratorSettings(
            control_address=servers["control"].address,
            cache_address=servers["cache"].address,
            executor_address=servers["executor"].address,
            models_file=models_file,
            guardrails_file=guardrails_file,
            redis_url=redis_url,
            data_dir=data_dir / "orchestrator",
            cache_admin_token=SecretStr(ADMIN_TOKEN),
            **trust,
            **LOCAL,
        )
        servers["orchestrator"] = await self.start(
            orchestrator, await build_orchestrator(orchestrator)
        )
        return servers

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        for server in reversed(self.servers):
            await server.stop(0)


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    made = Stack()
    yield made
    await made.stop()


async def generate(channel: grpc.aio.Channel, key: str) -> orchestrator_pb2.GenerateResponse:
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    return await stub.Generate(
        orchestrator_pb2.GenerateRequest(
            model="mock-fast", messages=[user(f"question {uuid.uuid4().hex}")]
        ),
        metadata=bearer(key),
        timeout=10,
    )


async def test_internal_services_refuse_calls_without_the_token(
    stack: Stack,
    redis_db: redis.Redis,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
    guardrails_file: Path,
    tmp_path: Path,
    test_keys: ApiKeys,
) -> None:
    servers = await stack.start_all(
        redis_url,
        tenants_file,
        models_file,
        guardrails_file,
        tmp_path,
        internal_token=SecretStr(TOKEN),
    )
    calls = {
        "control": lambda ch, md: control_pb2_grpc.ControlServiceStub(ch).Authenticate(
            control_pb2.AuthenticateRequest(api_key=test_keys.acme), metadata=md, timeout=5
        ),
        "cache": lambda ch, md: cache_pb2_grpc.CacheServiceStub(ch).Lookup(
            cache_pb2.LookupRequest(), metadata=md, timeout=5
        ),
        "executor": lambda ch, md: executor_pb2_grpc.ExecutorServiceStub(ch).ListModels(
            executor_pb2.ListModelsRequest(), metadata=md, timeout=5
        ),
    }
    for name, call in calls.items():
        channel = stack.channel(servers[name].address)
        for metadata in [(), ((INTERNAL_TOKEN_KEY, "wrong-token"),)]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(channel, metadata)
            error = rich_error(caught.value)
            assert (error.code, error.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "INTERNAL_TOKEN_INVALID",
            ), name
        # Probes carry no token: health stays open.
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING

    # With the token, a direct call goes through...
    executor = stack.channel(servers["executor"].address, Trust(token=TOKEN))
    models = await executor_pb2_grpc.ExecutorServiceStub(executor).ListModels(
        executor_pb2.ListModelsRequest(), timeout=5
    )
    assert models.models
    # ...and the orchestrator, which sends it on every call, answers end to end; its public
    # port asks its clients for no token.
    answer = await generate(stack.channel(servers["orchestrator"].address), test_keys.acme)
    assert answer.text and answer.usage.output_tokens > 0


async def test_mutual_tls_requires_a_certificate_from_the_ca(
    stack: Stack,
    redis_db: redis.Redis,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
    guardrails_file: Path,
    tmp_path: Path,
    test_keys: ApiKeys,
) -> None:
    files = await asyncio.to_thread(make_certs, tmp_path / "strata")
    servers = await stack.start_all(
        redis_url, tenants_file, models_file, guardrails_file, tmp_path, **files, public_tls=True
    )
    address = servers["executor"].address
    request = executor_pb2.ListModelsRequest()

    async def list_models(channel: grpc.aio.Channel) -> Any:
        return await executor_pb2_grpc.ExecutorServiceStub(channel).ListModels(request, timeout=3)

    # A client with a certificate signed by the CA gets an answer.
    trusted = Trust.of(ExecutorSettings(models_file=models_file, **files))
    assert (await list_models(stack.channel(address, trusted))).models

    # Plaintext, TLS without a client certificate, or a certificate from another CA: refused.
    other = await asyncio.to_thread(make_certs, tmp_path / "other")
    strangers = {
        "plaintext": stack.channel(address),
        "no certificate": stack.channel(address, Trust(ca=trusted.ca, tls=True)),
        "another CA": stack.channel(
            address,
            Trust(
                certificate=other["tls_cert_file"].read_bytes(),
                private_key=other["tls_key_file"].read_bytes(),
                ca=trusted.ca,
                tls=True,
            ),
        ),
    }
    for label, channel in strangers.items():
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await list_models(channel)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, label

    # The orchestrator reaches control, cache and executor over mutual TLS; its public port
    # (public_tls on) serves TLS to clients that have no certificate.
    orchestrator = servers["orchestrator"].address
    answer = await generate(
        stack.channel(orchestrator, Trust(ca=trusted.ca, tls=True)), test_keys.acme
    )
    assert answer.text and answer.usage.output_tokens > 0
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stack.channel(orchestrator), test_keys.acme)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # public_tls off (the default): the public port stays plaintext, for TLS at the ingress.
    assert not Trust.of(ServiceSettings(**files), public=True).tls


async def test_the_health_port_answers_plaintext_probes_of_a_service_that_requires_mtls(
    stack: Stack, models_file: Path, tmp_path: Path
) -> None:
    settings = ExecutorSettings(
        models_file=models_file, health_port=0, **make_certs(tmp_path / "certs"), **LOCAL
    )
    server = await stack.start(settings, await build_executor(settings))
    assert server.health_port
    check = health_pb2.HealthCheckRequest()
    # The service's port takes mutual TLS only, so a plaintext probe cannot use it...
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health_pb2_grpc.HealthStub(stack.channel(server.address)).Check(check, timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # ...and the health port answers it, for the process and for each service.
    probe = stack.channel(f"127.0.0.1:{server.health_port}")
    health = health_pb2_grpc.HealthStub(probe)
    for name in ["", *server.service.service_names]:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # Health alone: nothing else of the service is reachable without a certificate.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor_pb2_grpc.ExecutorServiceStub(probe).ListModels(
            executor_pb2.ListModelsRequest(), timeout=5
        )
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # Stopping: NOT_SERVING there as on the service's port, then the port closes.
    watch = health.Watch(check, timeout=10)
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    stopping = asyncio.create_task(server.stop(0.5))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    await stopping
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(check, timeout=2)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
