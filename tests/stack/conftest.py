"""The four services as subprocesses, a real Redis and a real HTTP upstream: what a user sees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from strata.orchestrator.v1 import orchestrator_pb2_grpc
from strata_cli.devstack import LocalStack


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, tenants_file: Path, models_file: Path
) -> Iterator[LocalStack]:
    running = LocalStack(
        run_dir=tmp_path_factory.mktemp("stack"),
        models_file=models_file,
        tenants_file=tenants_file,
        redis_url=redis_url,
    ).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def public_api(stack: LocalStack) -> Iterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
    with grpc.insecure_channel(stack.addresses["orchestrator"]) as channel:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
