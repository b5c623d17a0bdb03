"""The request record store against a real Redis (no gRPC)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio as aioredis

from services.common.errors import RequestInvalid, TraceNotFound
from services.common.redis_state import connect
from services.orchestrator.records import RecordStore, record_key
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, traces_pb2

TTL_S = 60


@pytest.fixture
async def client(redis_url: str, redis_db: redis.Redis) -> AsyncIterator[aioredis.Redis]:
    made = aioredis.Redis.from_url(redis_url)
    try:
        yield made
    finally:
        await made.aclose()


@pytest.fixture
def store(client: aioredis.Redis) -> RecordStore:
    return RecordStore(client, TTL_S)


def a_record(tenant: str = "acme", request_id: str = "req-1") -> traces_pb2.RequestRecord:
    record = traces_pb2.RequestRecord(
        request_id=request_id,
        tenant_id=tenant,
        trace_id="0af7651916cd43dd8448eb211c80319c",
        model="mock-fast",
        prompt=orchestrator_pb2.PromptInfo(prompt_hash="ab" * 32),
        request=orchestrator_pb2.GenerateRequest(
            model="mock-fast",
            messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="hi")],
            params=common_pb2.GenerationParams(seed=7),
        ),
        cache_status=common_pb2.CACHE_STATUS_MISS,
        attempts=[traces_pb2.AttemptRecord(model="mock-fast", outcome="OK")],
        outcome="OK",
        finish_reason=common_pb2.FINISH_REASON_STOP,
        output="Mock answer.",
        usage=common_pb2.Usage(input_tokens=3, output_tokens=2),
        stages=[traces_pb2.StageTiming(stage="model")],
    )
    record.create_time.FromSeconds(1_700_000_000)
    record.latency.FromMilliseconds(42)
    record.stages[0].duration.FromMilliseconds(30)
    return record


async def test_a_saved_record_reads_back_whole(store: RecordStore) -> None:
    record = a_record()

    await store.save(record)

    assert await store.get("acme", "req-1") == record


async def test_a_record_is_kept_under_its_tenant_for_the_ttl(
    store: RecordStore, redis_db: redis.Redis
) -> None:
    await store.save(a_record())

    key = record_key("acme", "req-1")
    assert key == "strata:trace:{acme}:req-1"
    assert 0 < int(redis_db.ttl(key)) <= TTL_S


async def test_records_saved_at_once_go_together_and_each_is_kept(
    store: RecordStore,
    client: aioredis.Redis,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = [a_record(tenant=f"t{n % 3}", request_id=f"req-{n}") for n in range(30)]
    alone: list[str] = []
    set_one = client.set

    async def counted(name: str, *args: Any, **kwargs: Any) -> Any:
        alone.append(name)
        return await set_one(name, *args, **kwargs)

    monkeypatch.setattr(client, "set", counted)
    await asyncio.gather(*(store.save(record) for record in records))

    # The first went alone; the 29 that piled up behind it, in one pipeline.
    assert alone == [record_key("t0", "req-0")]
    for record in records:
        assert await store.get(record.tenant_id, record.request_id) == record
        assert 0 < int(redis_db.ttl(record_key(record.tenant_id, record.request_id))) <= TTL_S


async def test_another_tenants_record_is_not_found(store: RecordStore) -> None:
    await store.save(a_record(tenant="acme"))

    with pytest.raises(TraceNotFound) as caught:
        await store.get("globex", "req-1")

    error = caught.value
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TRACE_NOT_FOUND")
    assert error.metadata == {"request_id": "req-1"}


async def test_an_unknown_request_is_not_found(store: RecordStore) -> None:
    with pytest.raises(TraceNotFound):
        await store.get("acme", "never-seen")


async def test_a_malformed_request_id_is_refused(store: RecordStore) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await store.get("acme", "no spaces/allowed")
    assert [v.field for v in caught.value.violations] == ["request_id"]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_saving_while_redis_is_down_only_logs(caplog: pytest.LogCaptureFixture) -> None:
    client = connect(f"redis://127.0.0.1:{_closed_port()}/0", timeout_s=0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="services.orchestrator.records"):
            await RecordStore(client, TTL_S).save(a_record())
    finally:
        await client.aclose()

    assert "req-1" in caplog.text
