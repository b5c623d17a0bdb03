"""Wires the orchestrator: settings → channels to control, cache, executor → generator."""

from __future__ import annotations

import functools

import grpc

from services.common.bootstrap import Service
from services.common.calls import check_serving, open_channel
from services.common.catalog import load_catalog
from services.common.guardrails import Guardrails
from services.orchestrator.clients import CacheClient, ControlClient, ExecutorClient
from services.orchestrator.generation import Generator
from services.orchestrator.servicer import OrchestratorServicer
from services.orchestrator.settings import OrchestratorSettings
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

SERVICE_NAME = orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name


async def build(settings: OrchestratorSettings) -> Service:
    """The orchestrator, ready for `bootstrap.start`."""
    catalog = load_catalog(settings.models_file)
    channels = {
        "control": open_channel(settings.control_address, settings.max_message_bytes),
        "cache": open_channel(settings.cache_address, settings.max_message_bytes),
        "executor": open_channel(settings.executor_address, settings.max_message_bytes),
    }
    generator = Generator(
        catalog,
        Guardrails.from_file(settings.guardrails_file),
        ControlClient(channels["control"], settings.admit_timeout_s, settings.settle_timeout_s),
        CacheClient(channels["cache"], settings.cache_timeout_s),
        ExecutorClient(channels["executor"]),
        audit_rate=settings.cache_audit_rate,
    )
    servicer = OrchestratorServicer(generator, settings.default_deadline_s)

    def register(server: grpc.aio.Server) -> None:
        orchestrator_pb2_grpc.add_OrchestratorServiceServicer_to_server(servicer, server)

    async def close() -> None:
        await generator.aclose()
        for channel in channels.values():
            await channel.close()

    return Service(
        name="orchestrator",
        register=register,
        service_names=[SERVICE_NAME],
        probes={name: functools.partial(check_serving, ch) for name, ch in channels.items()},
        close=close,
    )
