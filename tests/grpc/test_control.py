"""The control service through real stubs, against a real Redis."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import grpc
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.catalog import load_catalog
from services.common.guardrails import Guardrails
from services.common.redis_state import connect, run_pipeline
from services.control import admission as admission_module
from services.control.admission import AdmissionControl
from services.control.keys import KeyStore
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2
from tests.conftest import ApiKeys
from tests.faultproxy import Fault, FaultProxy
from tests.grpc.conftest import Served, StartControl
from tests.helpers import (
    eventually,
    held_decisions,
    rich_error,
    state_snapshot,
    usage_record,
    writes_paused,
)


def admit_request(key: str, tokens_in: int = 10, tokens_out: int = 20, **kw: Any):
    return control_pb2.AdmitRequest(
        request_id=str(kw.pop("request_id", uuid.uuid4().hex)),
        api_key=key,
        model="mock-small",
        estimated_input_tokens=tokens_in,
        max_output_tokens=tokens_out,
    )


def settle_request(
    admitted: control_pb2.AdmitResponse, request_id: str, used_in: int, used_out: int
):
    return control_pb2.SettleRequest(
        request_id=request_id,
        tenant_id=admitted.tenant_id,
        key_id=admitted.key_id,
        outcome=control_pb2.OUTCOME_SUCCESS,
        model="mock-small",
        usage=common_pb2.Usage(input_tokens=used_in, output_tokens=used_out),
        cost=common_pb2.Cost(input_usd_micros=3, output_usd_micros=4, total_usd_micros=7),
        cache_status=common_pb2.CACHE_STATUS_MISS,
    )


async def test_admit_names_the_tenant_and_key_and_plans_the_model(
    control: Served, test_keys: ApiKeys
) -> None:
    reply = await control.stub.Admit(admit_request(test_keys.acme))
    assert (reply.tenant_id, reply.key_id) == ("acme", "acme-main")
    assert [c.model for c in reply.plan] == ["mock-small"]
    assert reply.reserved_tokens == 30


async def test_authenticate_names_tenant_key_and_tier_by_key_or_hash(
    control: Served, test_keys: ApiKeys
) -> None:
    acme = await control.stub.Authenticate(control_pb2.AuthenticateRequest(api_key=test_keys.acme))
    assert (acme.tenant_id, acme.key_id, acme.tier) == ("acme", "acme-main", "")
    digest = hashlib.sha256(test_keys.globex.encode()).hexdigest()
    globex = await control.stub.Authenticate(control_pb2.AuthenticateRequest(api_key_sha256=digest))
    assert (globex.tenant_id, globex.key_id, globex.tier) == ("globex", "globex-main", "free")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.stub.Authenticate(
            control_pb2.AuthenticateRequest(
                api_key_sha256=hashlib.sha256(test_keys.disabled.encode()).hexdigest()
            )
        )
    assert rich_error(caught.value).reason == "API_KEY_INVALID"


@pytest.mark.parametrize("which", ["unknown", "disabled", "malformed"])
async def test_bad_keys_are_unauthenticated(
    control: Served, test_keys: ApiKeys, redis_db: redis.Redis, which: str
) -> None:
    key = {
        "unknown": "sk-strata-" + "x" * 43,
        "disabled": test_keys.disabled,
        "malformed": "hello",
    }[which]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.stub.Admit(admit_request(key))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.UNAUTHENTICATED
    assert (error.reason, error.domain) == ("API_KEY_INVALID", "strata")
    assert key not in error.message


async def test_request_limit_refuses_with_retry_delay(control: Served, test_keys: ApiKeys) -> None:
    for _ in range(3):
        await control.stub.Admit(admit_request(test_keys.tight))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.stub.Admit(admit_request(test_keys.tight))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "RATE_LIMITED"
    assert error.metadata["limit"] == "requests_per_minute"
    assert error.metadata["limit_value"] == "3"
    # 3 per minute: the next slot opens about 20 s after the first request.
    assert error.retry_delay_s is not None and 15 < error.retry_delay_s <= 20


async def test_limits_hold_under_concurrent_admits(control: Served, test_keys: ApiKeys) -> None:
    results = await asyncio.gather(
        *(control.stub.Admit(admit_request(test_keys.tight)) for _ in range(12)),
        return_exceptions=True,
    )
    admitted = [r for r in results if isinstance(r, control_pb2.AdmitResponse)]
    refused = [rich_error(r).reason for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert len(admitted) == 3
    assert refused == ["RATE_LIMITED"] * 9


async def test_token_limit_counts_reserved_tokens(control: Served, test_keys: ApiKeys) -> None:
    await control.stub.Admit(admit_request(test_keys.tokens, 300, 300))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.stub.Admit(admit_request(test_keys.tokens, 300, 300))
    error = rich_error(caught.value)
    assert (error.reason, error.metadata["limit"]) == ("RATE_LIMITED", "tokens_per_minute")
    assert error.retry_delay_s is not None and error.retry_delay_s > 0


async def test_settlement_returns_unused_tokens(control: Served, test_keys: ApiKeys) -> None:
    request_id = uuid.uuid4().hex
    admitted = await control.stub.Admit(
        admit_request(test_keys.tokens, 300, 600, request_id=request_id)
    )
    # 900 of 1000 reserved: another 300 does not fit until the unused 800 come back.
    with pytest.raises(grpc.aio.AioRpcError):
        await control.stub.Admit(admit_request(test_keys.tokens, 100, 200))
    await control.stub.Settle(settle_request(admitted, request_id, 60, 40))
    await control.stub.Admit(admit_request(test_keys.tokens, 300, 500))


async def test_request_larger_than_the_token_limit_is_refused_outright(
    control: Served, test_keys: ApiKeys
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.stub.Admit(admit_request(test_keys.tokens, 900, 200))
    error = rich_error(caught.value)
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.reason == "REQUEST_EXCEEDS_LIMIT"
    assert error.retry_delay_s is None


async def test_admit_is_idempotent_by_request_id(control: Served, test_keys: ApiKeys) -> None:
    request = admit_request(test_keys.tight)
    replies = [await control.stub.Admit(request) for _ in range(5)]
    assert {r.reserved_tokens for r in replies} == {30}
    # The repeats reserved nothing: two more distinct requests still fit in 3/minute.
    await control.stub.Admit(admit_request(test_keys.tight))
    await control.stub.Admit(admit_request(test_keys.tight))


async def test_settle_records_usage_once(
    control: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    request_id = uuid.uuid4().hex
    admitted = await control.stub.Admit(admit_request(test_keys.acme, request_id=request_id))
    settle = settle_request(admitted, request_id, 11, 22)
    replies = await asyncio.gather(*(control.stub.Settle(settle) for _ in range(4)))
    assert sorted(r.applied for r in replies) == [False, False, False, True]
    usage = usage_record(redis_db)
    assert usage["requests"] == 1
    assert (usage["input_tokens"], usage["output_tokens"], usage["spent"]) == (11, 22, 7)
    assert usage["model:mock-small:input_tokens"] == 11
    assert usage_record(redis_db, key_id="acme-main")["output_tokens"] == 22
    assert not redis_db.hexists("strata:{t:acme}:reservations", request_id)
    assert int(redis_db.hget("strata:{t:acme}:reserved", "tenant") or 0) == 0


async def test_a_settle_batch_settles_each_entry_once_as_settle_would(
    control: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    ids = [uuid.uuid4().hex for _ in range(3)]
    admitted = [await control.stub.Admit(admit_request(test_keys.acme, request_id=i)) for i in ids]
    settlements = [
        settle_request(a, i, 10 + n, 20 + n)
        for n, (a, i) in enumerate(zip(admitted, ids, strict=True))
    ]
    # One of them was settled alone already: the batch applies the other two.
    await control.stub.Settle(settlements[1])
    batch = control_pb2.SettleBatchRequest(
        entries=[control_pb2.SettleBatchEntry(settlement=s) for s in settlements]
    )
    reply = await control.stub.SettleBatch(batch)
    assert list(reply.applied) == [True, False, True]
    again = await control.stub.SettleBatch(batch)
    assert list(again.applied) == [False, False, False]
    usage = usage_record(redis_db)
    assert usage["requests"] == 3
    assert (usage["input_tokens"], usage["output_tokens"], usage["spent"]) == (33, 63, 21)
    assert redis_db.hlen("strata:{t:acme}:reservations") == 0
    assert int(redis_db.hget("strata:{t:acme}:reserved", "tenant") or 0) == 0


@pytest.mark.parametrize(
    ("entries", "fields"),
    [
        ([], ["entries"]),
        (["ok", "no-tenant"], ["entries[1].settlement.tenant_id"]),
        (["ok", "long-trace"], ["entries[1].traceparent"]),
    ],
)
async def test_an_invalid_settle_batch_applies_nothing(
    control: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    entries: list[str],
    fields: list[str],
) -> None:
    batch = control_pb2.SettleBatchRequest()
    for shape in entries:
        request_id = uuid.uuid4().hex
        admitted = await control.stub.Admit(admit_request(test_keys.acme, request_id=request_id))
        entry = batch.entries.add(settlement=settle_request(admitted, request_id, 1, 1))
        if shape == "no-tenant":
            entry.settlement.tenant_id = ""
        elif shape == "long-trace":
            entry.traceparent = "0" * 257

    def settlements() -> dict[bytes, Any]:
        return {k: redis_db.hgetall(k) for k in redis_db.scan_iter("strata:{t:acme}:settled:*")}

    before = settlements()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.stub.SettleBatch(batch)
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == fields
    # Every reservation still held, nothing counted or charged (not even the valid entry).
    assert redis_db.hlen("strata:{t:acme}:reservations") == len(entries)
    assert usage_record(redis_db) == {}
    assert settlements() == before


async def test_every_state_key_expires(
    control: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    request_id = uuid.uuid4().hex
    admitted = await control.stub.Admit(admit_request(test_keys.tight, request_id=request_id))
    await control.stub.Admit(admit_request(test_keys.tokens))
    await control.stub.Settle(settle_request(admitted, request_id, 1, 1))
    configuration = (b":policy", b":keys", b"strata:key:", b"strata:tenants")
    for key in redis_db.scan_iter("strata:*"):
        if any(part in key for part in configuration):
            continue  # keys, limits and budgets are configuration, kept until changed
        assert redis_db.ttl(key) > 0, key


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"request_id": "has space"}, "request_id"),
        ({"model": ""}, "model"),
        ({"estimated_input_tokens": 0}, "estimated_input_tokens"),
        ({"max_output_tokens": -1}, "max_output_tokens"),
    ],
)
async def test_invalid_admit_changes_nothing(
    control: Served, test_keys: ApiKeys, redis_db: redis.Redis, change: dict, field: str
) -> None:
    request = admit_request(test_keys.acme)
    for name, value in change.items():
        setattr(request, name, value)
    before = state_snapshot(redis_db)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await control.stub.Admit(request)
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == [field]
    assert state_snapshot(redis_db) == before


async def test_health_serves_once_redis_answers(control: Served) -> None:
    stub = health_pb2_grpc.HealthStub(control.channel)
    request = health_pb2.HealthCheckRequest(service="strata.control.v1.ControlService")
    async with asyncio.timeout(5):
        async for reply in stub.Watch(request):
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                break


async def test_admission_and_settlement_survive_redis_losing_its_scripts(
    control: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    """The scripts go by sha alone (no SCRIPT EXISTS per call); a Redis that lost them
    (restarted, flushed, failed over) gets them again and the call goes through once."""
    request_id = uuid.uuid4().hex
    redis_db.script_flush()
    admitted = await control.stub.Admit(admit_request(test_keys.acme, request_id=request_id))
    assert admitted.reserved_tokens == 30
    redis_db.script_flush()
    reply = await control.stub.Settle(settle_request(admitted, request_id, 11, 22))
    assert reply.applied
    usage = usage_record(redis_db)
    assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (1, 11, 22)
    assert not redis_db.hexists("strata:{t:acme}:reservations", request_id)


async def test_a_decision_asks_redis_no_script_exists(
    control: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    """redis-py's scripts in a pipeline ask SCRIPT EXISTS before every execute: a round trip
    per admission and settlement that Strata does not make."""
    warm = uuid.uuid4().hex
    admitted = await control.stub.Admit(admit_request(test_keys.acme, request_id=warm))
    await control.stub.Settle(settle_request(admitted, warm, 1, 1))

    def script_calls() -> int:
        stats = redis_db.info("commandstats")
        return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_script"))

    before = script_calls()
    for _ in range(3):
        request_id = uuid.uuid4().hex
        admitted = await control.stub.Admit(admit_request(test_keys.acme, request_id=request_id))
        await control.stub.Settle(settle_request(admitted, request_id, 1, 1))
    assert script_calls() == before


@pytest.fixture
async def admission(
    control: Served, redis_url: str, models_file: Path, guardrails_file: Path
) -> AsyncIterator[AdmissionControl]:
    """Control's admission itself, on the tenants `control` wrote, so that a test can cut a
    call at the moment it chooses; its Redis timeout outlasts the pauses below."""
    client = connect(redis_url, 5.0)
    guardrails = Guardrails.from_file(guardrails_file)
    keys = KeyStore(client, guardrails.profile(None).name)
    yield AdmissionControl(keys, client, load_catalog(models_file), guardrails, 900, 3600)
    await client.aclose()


async def test_settlements_kept_through_a_redis_outage_go_a_batch_to_a_round_trip(
    control: Served,
    test_keys: ApiKeys,
    redis_url: str,
    models_file: Path,
    guardrails_file: Path,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Settlements Redis could not take (its connections reset) are kept; once it answers,
    they are written DEFERRED_BATCH to a round trip, each applied once, nothing left held.
    One Redis refuses (globex's reservations made a key of the wrong type) fails its batch
    whole: that batch goes again one by one, and only the one at fault is dropped."""
    monkeypatch.setattr(admission_module, "DEFERRED_BATCH", 3)
    target = urlparse(redis_url)
    assert target.hostname and target.port
    with FaultProxy(target.hostname, target.port) as proxy:
        client = connect(f"redis://{target.hostname}:{proxy.port}{target.path}", 1.0)
        guardrails = Guardrails.from_file(guardrails_file)
        keys = KeyStore(client, guardrails.profile(None).name)
        admission = AdmissionControl(keys, client, load_catalog(models_file), guardrails, 900, 3600)
        admitted = []
        for key in [test_keys.acme] * 7 + [test_keys.globex]:
            request = admit_request(key)
            admitted.append((request.request_id, await admission.admit(request)))
        redis_db.delete("strata:{t:globex}:reserved")
        redis_db.set("strata:{t:globex}:reserved", "not a hash")
        proxy.set_fault(Fault.RESET)
        for request_id, admit in admitted:
            reply = control_pb2.AdmitResponse(
                tenant_id=admit.key.tenant_id, key_id=admit.key.key_id
            )
            assert await admission.settle(settle_request(reply, request_id, 11, 22)) is False
        assert usage_record(redis_db).get("requests", 0) == 0
        proxy.clear()
        pipelines: list[int] = []

        async def counted(client: Any, build: Callable[[Any], None], scripts: Any) -> list[Any]:
            pipelines.append(1)
            return await run_pipeline(client, build, scripts)

        monkeypatch.setattr(admission_module, "run_pipeline", counted)
        try:
            assert await admission.write_deferred() == 8
            assert await admission.write_deferred() == 0
        finally:
            await client.aclose()
    assert len(pipelines) == 5  # 3, 3, then 2 refused and each of them again
    assert usage_record(redis_db, "globex").get("requests", 0) == 0
    usage = usage_record(redis_db)
    assert (usage["requests"], usage["input_tokens"], usage["output_tokens"]) == (7, 77, 154)
    assert redis_db.hlen("strata:{t:acme}:reservations") == 0
    assert int(redis_db.hget("strata:{t:acme}:reserved", "tenant") or 0) == 0


async def cut_while_redis_decides(
    admission: AdmissionControl, request: control_pb2.AdmitRequest, redis_db: redis.Redis
) -> None:
    """Admits `request` (writes paused) and cancels the call while Redis holds its script."""
    cut = asyncio.create_task(admission.admit_call(request))
    await held_decisions(redis_db, 1)
    cut.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cut


async def test_an_admission_whose_caller_was_cut_is_settled_as_cancelled(
    admission: AdmissionControl, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    """A caller cut while Redis decides (its deadline, its client gone) never learns of its
    admission: it is settled at once, not left holding the tenant's concurrency and budget
    until it expires into a worst-case charge."""
    request = admit_request(test_keys.acme)
    with writes_paused(redis_db):
        await cut_while_redis_decides(admission, request, redis_db)
    await admission.drain()
    assert not redis_db.hexists("strata:{t:acme}:reservations", request.request_id)
    assert not redis_db.zscore("strata:{t:acme}:pending", request.request_id)
    assert int(redis_db.hget("strata:{t:acme}:reserved", "tenant") or 0) == 0
    usage = usage_record(redis_db)
    assert (usage["requests"], usage["outcome_cancelled"], usage.get("spent", 0)) == (1, 1, 0)


async def test_a_cut_admission_given_to_a_retry_is_left_to_the_retry(
    admission: AdmissionControl, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    """The same request id admitted again before the cut call's settlement (a retry) is
    given the same admission: the retry settles it, with what it used, and is charged."""
    request = admit_request(test_keys.acme)
    with writes_paused(redis_db):
        await cut_while_redis_decides(admission, request, redis_db)
        retry = asyncio.create_task(admission.admit_call(request))
        await held_decisions(redis_db, 2)
    admitted = await retry
    await admission.drain()
    assert (admitted.replayed, admitted.number) == (True, 1)
    assert redis_db.hexists("strata:{t:acme}:reservations", request.request_id)
    settle = control_pb2.SettleRequest(
        request_id=request.request_id,
        tenant_id="acme",
        key_id=admitted.key.key_id,
        team_id=admitted.key.team_id,
        outcome=control_pb2.OUTCOME_SUCCESS,
        model="mock-small",
        usage=common_pb2.Usage(input_tokens=11, output_tokens=22),
        cost=common_pb2.Cost(total_usd_micros=7),
        admission=admitted.number,
    )
    assert await admission.settle(settle)
    usage = usage_record(redis_db)
    assert (usage["requests"], usage["input_tokens"], usage["spent"]) == (1, 11, 7)
    assert usage.get("outcome_cancelled", 0) == 0
    assert not redis_db.hexists("strata:{t:acme}:reservations", request.request_id)


async def test_admit_past_its_deadline_holds_no_reservation(
    start_control: StartControl, tenants_file: Path, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    """Through gRPC: the server cancels the Admit whose deadline passed while Redis decided;
    what Redis then reserved is settled as cancelled."""
    control = await start_control(tenants_file, redis_timeout_s=5.0)
    request = admit_request(test_keys.acme)
    with writes_paused(redis_db):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await control.stub.Admit(request, timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await held_decisions(redis_db, 1)
        # The server's side of the deadline cancels the handler on this same loop.
        await asyncio.sleep(0.3)
    await eventually(lambda: usage_record(redis_db).get("outcome_cancelled", 0) == 1)
    assert not redis_db.hexists("strata:{t:acme}:reservations", request.request_id)
