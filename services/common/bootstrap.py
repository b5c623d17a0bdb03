"""One way to run a service: `start()` for tests, `run()` for `python -m services.<name>`.

Both build the same grpc.aio server: the service's handlers, the standard health service
(NOT_SERVING until every dependency probe answers, and kept true by re-probing), server
reflection, and a bound port (0 in tests). Interceptors guard every call: the internal
token on internal services (`security`), the bound on calls in flight (`limits`), then
tracing (`telemetry`). The port is plaintext or TLS as `security.Trust` says; with
`health_port` set, a second server answers health alone, in plaintext. `run()` adds
the signals: on SIGTERM or SIGINT health turns NOT_SERVING, open calls get
`shutdown_grace_s` to finish, then the service's clients close.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import interception, limits, logs, loops, security, telemetry
from services.common.settings import ConfigError, ServiceSettings, load_settings
from services.common.tasks import cancel_and_wait

log = logging.getLogger(__name__)

Probe = Callable[[], Awaitable[object]]
"""Raises (or times out) when a dependency does not answer."""

PROBE_TIMEOUT_S = 2.0
HEALTH_MESSAGE_BYTES = 4096
"""Largest request the health-only port takes (a health request is a service name)."""
HEALTH_CONCURRENT_CALLS = 64
"""Calls the health-only port serves at once (probes and watchers)."""


def answered_once(probe: Probe) -> Probe:
    """A probe that passes for good once `probe` has passed.

    For a dependency the service degrades without (Redis: the cache misses, admission
    falls back to per-process limits and refuses budgets, generation goes on without the
    cache): SERVING waits for it at start-up, but a later outage keeps the service in
    rotation instead of taking every replica out at once.
    """
    seen = False

    async def check() -> None:
        nonlocal seen
        if not seen:
            await probe()
            seen = True

    return check


@dataclass
class Service:
    """What a service plugs into the bootstrap."""

    name: str
    """Short name for logs: orchestrator, control, cache, executor."""
    register: Callable[[grpc.aio.Server], None]
    """Adds the service's servicers to the server."""
    service_names: Sequence[str]
    """Full names of the gRPC services, for health and reflection."""
    probes: Mapping[str, Probe] = field(default_factory=dict)
    """Dependencies that must answer before the service reports SERVING, by name."""
    close: Callable[[], Awaitable[None]] | None = None
    """Releases the service's clients after the server has stopped."""


def server_options(settings: ServiceSettings) -> list[tuple[str, Any]]:
    """Channel arguments for the server: message size bounds and keepalive."""
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


class RunningServer:
    """A started service: its port, and how to stop it."""

    def __init__(
        self,
        server: grpc.aio.Server,
        service: Service,
        health_servicer: health.aio.HealthServicer,
        port: int,
        settings: ServiceSettings,
        health_server: grpc.aio.Server | None = None,
        health_port: int | None = None,
    ) -> None:
        self.server = server
        self.service = service
        self.health = health_servicer
        self.port = port
        self.address = f"{settings.host}:{port}"
        self.health_port = health_port
        """The plaintext health-only port (`health_port` setting), if any."""
        self._health_server = health_server
        self._settings = settings
        self._watch = asyncio.create_task(self._watch_health(), name=f"{service.name}-health")
        self._stopped = False
        self.telemetry: telemetry.Telemetry | None = None
        self.inflight: limits.InflightLimit | None = None

    async def _watch_health(self) -> None:
        names = ["", *self.service.service_names]
        serving: bool | None = None
        retry_s = 0.05
        while True:
            failed = await _failed_probes(self.service.probes)
            if (not failed) != serving:
                serving = not failed
                status = (
                    health_pb2.HealthCheckResponse.SERVING
                    if serving
                    else health_pb2.HealthCheckResponse.NOT_SERVING
                )
                for name in names:
                    await self.health.set(name, status)
                if serving:
                    log.info("%s serving on %s", self.service.name, self.address)
                else:
                    log.warning("%s not serving: %s did not answer", self.service.name, failed)
            if serving:
                await asyncio.sleep(self._settings.health_probe_interval_s)
            else:
                await asyncio.sleep(retry_s)
                retry_s = min(retry_s * 2, 1.0)

    async def stop(self, grace_s: float | None = None) -> None:
        """Turns health NOT_SERVING, lets open calls finish within the grace, closes clients."""
        if self._stopped:
            return
        self._stopped = True
        await cancel_and_wait(self._watch)
        await self.health.enter_graceful_shutdown()
        grace = self._settings.shutdown_grace_s if grace_s is None else grace_s
        await self.server.stop(grace)
        if self._health_server is not None:
            # Answered NOT_SERVING through the grace; then gone with the service.
            await self._health_server.stop(0)
        if self.service.close is not None:
            await self.service.close()
        if self.telemetry is not None:
            made, self.telemetry = self.telemetry, None
            await asyncio.to_thread(telemetry.release, self.service.name, made)
        log.info("%s stopped", self.service.name)


async def _failed_probes(probes: Mapping[str, Probe]) -> list[str]:
    async def check(probe: Probe) -> bool:
        try:
            async with asyncio.timeout(PROBE_TIMEOUT_S):
                await probe()
        except Exception:
            return False
        return True

    results = await asyncio.gather(*(check(p) for p in probes.values()))
    return [name for name, ok in zip(probes, results, strict=True) if not ok]


async def start(settings: ServiceSettings, service: Service) -> RunningServer:
    """Builds, binds and starts the server; health turns SERVING once the probes pass."""
    trust, internal = security.server_trust(settings, service.name)
    made = telemetry.configure_from(service.name, settings)
    inflight = limits.inflight_limit(
        settings.max_inflight, internal, settings.batch_share, settings.overload_retry_after_s
    )
    # The token check is an interceptor: it refuses before the request is parsed. The rest
    # wraps each method once, as it is registered (see services.common.interception).
    guards: list[Any] = []
    if internal and trust.token:
        guards.append(security.InternalTokenCheck(trust.token))
    server = grpc.aio.server(
        options=server_options(settings),
        interceptors=guards or None,
        maximum_concurrent_rpcs=limits.hard_bound(inflight.limit),
    )
    wrap = interception.chain(limits.counting(inflight), telemetry.server_tracing(service.name))
    service.register(cast(grpc.aio.Server, interception.WrappingServer(server, wrap)))
    health_servicer = health.aio.HealthServicer()
    for name in ["", *service.service_names]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service.service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{settings.host}:{settings.port}"
    credentials = trust.server_credentials(require_client_auth=internal)
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"{service.name}: cannot bind {settings.host}:{settings.port}")
    health_server, health_port = None, None
    if settings.health_port is not None:
        health_server, health_port = _health_only(settings, health_servicer)
    await server.start()
    if health_server is not None:
        await health_server.start()
    if settings.port_file is not None:
        _write_atomically(settings.port_file, f"{port}\n")
    running = RunningServer(
        server, service, health_servicer, port, settings, health_server, health_port
    )
    running.telemetry = made
    running.inflight = inflight
    return running


def _health_only(
    settings: ServiceSettings, health_servicer: health.aio.HealthServicer
) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with the health service alone (the same statuses as the main
    port's), for probes that cannot present a client certificate."""
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", HEALTH_MESSAGE_BYTES)],
        maximum_concurrent_rpcs=HEALTH_CONCURRENT_CALLS,
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port(f"{settings.host}:{settings.health_port}")
    if port == 0:
        raise RuntimeError(f"cannot bind the health port {settings.host}:{settings.health_port}")
    return server, port


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


_Settings = TypeVar("_Settings", bound=ServiceSettings)


def main(
    name: str, settings_class: type[_Settings], build: Callable[[_Settings], Awaitable[Service]]
) -> None:
    """Entry point of `python -m services.<name>`: settings from the environment, then `run`."""
    settings = load_settings(settings_class)
    try:
        loops.run(run(name, settings, lambda: build(settings)), settings.event_loop)
    except ConfigError as err:
        sys.exit(f"{name}: {err}")


async def run(
    name: str, settings: ServiceSettings, build: Callable[[], Awaitable[Service]]
) -> None:
    """Runs a service until SIGTERM or SIGINT, then drains it."""
    logs.configure(name, settings.log_level)
    service = await build()
    running = await start(settings, service)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("%s listening on %s", service.name, running.address)
    await stop.wait()
    log.info("%s draining (grace %.1fs)", service.name, settings.shutdown_grace_s)
    await running.stop()
