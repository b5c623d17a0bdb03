"""The four services as subprocesses, a real Redis and a real HTTP upstream: what a user sees."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis

from strata.orchestrator.v1 import orchestrator_pb2_grpc
from strata_cli.devstack import LocalStack
from tests.helpers import fresh_stack


@pytest.fixture
def redis_db(redis_url: str) -> Iterator[redis.Redis]:
    """The stack's Redis, not emptied between tests (the services keep their state there)."""
    client = redis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
    guardrails_file: Path,
) -> Iterator[LocalStack]:
    running = fresh_stack(
        tmp_path_factory.mktemp("stack"),
        redis_url,
        tenants_file,
        models_file,
        {
            "STRATA_CONTROL_GUARDRAILS_FILE": str(guardrails_file),
            "STRATA_ORCHESTRATOR_GUARDRAILS_FILE": str(guardrails_file),
        },
    )
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def public_api(stack: LocalStack) -> Iterator[orchestrator_pb2_grpc.OrchestratorServiceStub]:
    with grpc.insecure_channel(stack.addresses["orchestrator"]) as channel:
        yield orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
