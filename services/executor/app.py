"""Wires the executor: settings → catalog → providers → executor → servicer."""

from __future__ import annotations

import asyncio

import grpc

from services.common.bootstrap import Service
from services.common.catalog import load_catalog
from services.executor import tokens
from services.executor.completion import Executor
from services.executor.providers import build_providers
from services.executor.servicer import ExecutorServicer
from services.executor.settings import ExecutorSettings
from strata.executor.v1 import executor_pb2, executor_pb2_grpc

SERVICE_NAME = executor_pb2.DESCRIPTOR.services_by_name["ExecutorService"].full_name


async def build(settings: ExecutorSettings) -> Service:
    """The executor service, ready for `bootstrap.start`."""
    catalog = load_catalog(settings.models_file)
    # Loaded (and its file verified) now, not on the first request that needs it.
    await asyncio.to_thread(tokens.encoding)
    executor = Executor(catalog, build_providers(catalog))
    servicer = ExecutorServicer(executor, settings.default_deadline_s)

    def register(server: grpc.aio.Server) -> None:
        executor_pb2_grpc.add_ExecutorServiceServicer_to_server(servicer, server)

    return Service(
        name="executor",
        register=register,
        service_names=[SERVICE_NAME],
        close=executor.aclose,
    )
