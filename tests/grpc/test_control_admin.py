"""The control service's admin API through real stubs, against a real Redis: the admin token,
API keys (create, list, revoke on every replica), budgets, limits, usage and breakers."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml

from services.common.catalog import load_catalog
from services.control.keys import KEY_PREFIX, hash_key, new_key, valid_id
from strata.common.v1 import common_pb2
from strata.control.v1 import admin_pb2, admin_pb2_grpc, control_pb2
from tests.conftest import ApiKeys
from tests.grpc.conftest import ADMIN_TOKEN, Served, StartControl
from tests.helpers import RichError, bearer, eventually, rich_error, state_snapshot

AUTH = bearer(ADMIN_TOKEN)


def admin_of(served: Served) -> Any:
    return admin_pb2_grpc.ControlAdminServiceStub(served.channel)


def rid() -> str:
    return uuid.uuid4().hex


def admit_request(key: str, model: str = "mock-fast", **kw: Any) -> control_pb2.AdmitRequest:
    return control_pb2.AdmitRequest(
        request_id=kw.pop("request_id", None) or rid(),
        api_key=key,
        model=model,
        estimated_input_tokens=kw.pop("tokens_in", 1000),
        max_output_tokens=kw.pop("tokens_out", 1000),
        **kw,
    )


async def refusal(call: Awaitable[Any]) -> RichError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return rich_error(caught.value)


async def create_key(admin: Any, tenant: str, key_id: str = "", team: str = "", **kw: Any):
    return await admin.CreateApiKey(
        admin_pb2.CreateApiKeyRequest(
            request_id=kw.pop("request_id", None) or rid(),
            tenant_id=tenant,
            key_id=key_id,
            team_id=team,
        ),
        metadata=AUTH,
    )


def all_rpcs() -> list[tuple[str, Any]]:
    """Every admin RPC with a request that would be valid with the token."""
    day = admin_pb2.PERIOD_DAY
    tenant = admin_pb2.SCOPE_TENANT
    return [
        ("CreateApiKey", admin_pb2.CreateApiKeyRequest(request_id="a1", tenant_id="acme")),
        ("ListApiKeys", admin_pb2.ListApiKeysRequest(tenant_id="acme")),
        (
            "RevokeApiKey",
            admin_pb2.RevokeApiKeyRequest(request_id="a2", tenant_id="acme", key_id="acme-main"),
        ),
        (
            "SetBudget",
            admin_pb2.SetBudgetRequest(
                request_id="a3", tenant_id="acme", scope=tenant, period=day, limit_usd_micros=1
            ),
        ),
        (
            "SetLimits",
            admin_pb2.SetLimitsRequest(
                request_id="a4", tenant_id="acme", scope=tenant, requests_per_minute=1
            ),
        ),
        ("GetUsage", admin_pb2.GetUsageRequest(tenant_id="acme", scope=tenant, period=day)),
        ("ListBreakers", admin_pb2.ListBreakersRequest()),
    ]


# --- the admin token ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        (("authorization", "Bearer wrong-token"),),
        (("authorization", f"Bearer {ADMIN_TOKEN}x"),),
        (("authorization", f"Basic {ADMIN_TOKEN}"),),
        (("authorization", ADMIN_TOKEN),),
        (("authorization", "Bearer "),),
        (("x-admin-token", ADMIN_TOKEN),),
    ],
    ids=["none", "wrong", "longer", "basic", "no-scheme", "empty", "other-header"],
)
async def test_missing_or_wrong_admin_token_is_refused_by_every_call(
    admin: Any, admin_control: Served, test_keys: ApiKeys, redis_db: redis.Redis, metadata: Any
) -> None:
    before = state_snapshot(redis_db)

    for rpc, request in all_rpcs():
        error = await refusal(getattr(admin, rpc)(request, metadata=metadata))

        assert (error.code, error.reason) == (
            grpc.StatusCode.UNAUTHENTICATED,
            "ADMIN_TOKEN_INVALID",
        ), rpc
        assert ADMIN_TOKEN not in error.message
    assert state_snapshot(redis_db) == before
    # The key the revoke named still works.
    await admin_control.stub.Admit(admit_request(test_keys.acme))


async def test_the_token_is_checked_before_the_request(admin: Any) -> None:
    error = await refusal(admin.SetBudget(admin_pb2.SetBudgetRequest(request_id="bad id")))

    assert error.reason == "ADMIN_TOKEN_INVALID"


async def test_a_server_without_an_admin_token_refuses_every_call(
    start_control: StartControl, tenants_file: Path, redis_db: redis.Redis
) -> None:
    served = await start_control(tenants_file, admin_token=None)
    admin = admin_of(served)
    before = state_snapshot(redis_db)

    for metadata in (AUTH, bearer(""), None):
        for rpc, request in all_rpcs():
            error = await refusal(getattr(admin, rpc)(request, metadata=metadata))
            assert (error.code, error.reason) == (
                grpc.StatusCode.UNAUTHENTICATED,
                "ADMIN_TOKEN_INVALID",
            ), rpc
    assert state_snapshot(redis_db) == before


# --- API keys -------------------------------------------------------------------------------


async def test_a_created_key_is_usable_at_once(
    admin: Any, admin_control: Served, redis_db: redis.Redis
) -> None:
    started = time.time()

    created = await create_key(admin, "initech", "ini-1", "search")

    assert created.api_key.startswith(KEY_PREFIX) and len(created.api_key) == len(KEY_PREFIX) + 43
    record = created.key
    assert (record.tenant_id, record.key_id, record.team_id) == ("initech", "ini-1", "search")
    assert record.state == admin_pb2.API_KEY_STATE_ACTIVE
    assert record.prefix == created.api_key[:14]
    assert started - 1 <= record.create_time.ToMicroseconds() / 1e6 <= time.time() + 1
    reply = await admin_control.stub.Admit(admit_request(created.api_key))
    assert (reply.tenant_id, reply.key_id, reply.team_id) == ("initech", "ini-1", "search")
    assert [c.model for c in reply.plan] == ["mock-fast"]
    # Stored only as its hash.
    digest = hash_key(created.api_key)
    assert redis_db.hget(f"strata:key:{digest}", "key_id") == b"ini-1"
    for key in redis_db.scan_iter("strata:*key*"):
        assert created.api_key.encode() not in str(state_snapshot(redis_db)[key]).encode(), key


async def test_a_created_key_carries_its_tenants_tier(admin: Any, admin_control: Served) -> None:
    created = await create_key(admin, "globex", "globex-2")

    who = await admin_control.stub.Authenticate(
        control_pb2.AuthenticateRequest(api_key=created.api_key)
    )
    assert (who.tenant_id, who.key_id, who.tier) == ("globex", "globex-2", "free")


async def test_a_created_key_gets_an_id_when_none_is_given(
    admin: Any, admin_control: Served
) -> None:
    created = await create_key(admin, "initech")

    assert valid_id(created.key.key_id) and created.key.key_id.startswith("key-")
    reply = await admin_control.stub.Admit(admit_request(created.api_key))
    assert reply.key_id == created.key.key_id


async def test_create_is_idempotent_by_request_id(admin: Any, redis_db: redis.Redis) -> None:
    request_id = rid()

    first = await create_key(admin, "initech", "ini-1", request_id=request_id)
    repeats = await asyncio.gather(
        *(create_key(admin, "initech", "ini-1", request_id=request_id) for _ in range(3))
    )

    # A repeat gets the same key record, but never the clear key again: it is not stored.
    assert first.api_key
    assert all(r.key == first.key and not r.api_key for r in repeats)
    kept: list[Any] = [redis_db.get(k) for k in redis_db.scan_iter("strata:admin:request:*")]
    stored = b"".join(v for v in kept if v)
    assert first.api_key.encode() not in stored
    listed = await admin.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="initech"), metadata=AUTH
    )
    assert [k.key_id for k in listed.keys] == ["ini-1"]
    records = [k for k in redis_db.scan_iter("strata:key:*") if redis_db.hget(k, "tenant")]
    assert [redis_db.hget(k, "tenant") for k in records].count(b"initech") == 1
    # Even with another key id, the same request id answers the first call.
    other = await create_key(admin, "initech", "ini-2", request_id=request_id)
    assert other.key == first.key


async def test_a_request_id_used_for_another_call_is_invalid(
    admin: Any, admin_control: Served
) -> None:
    request_id = rid()
    created = await create_key(admin, "initech", "ini-1", request_id=request_id)

    error = await refusal(
        admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(
                request_id=request_id, tenant_id="initech", key_id="ini-1"
            ),
            metadata=AUTH,
        )
    )

    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == ["request_id"]
    await admin_control.stub.Admit(admit_request(created.api_key))  # not revoked


async def test_an_existing_key_id_is_refused(admin: Any, admin_control: Served) -> None:
    first = await create_key(admin, "initech", "ini-1")

    error = await refusal(create_key(admin, "initech", "ini-1"))

    assert (error.code, error.field_violations) == (grpc.StatusCode.INVALID_ARGUMENT, ["key_id"])
    reply = await admin_control.stub.Admit(admit_request(first.api_key))
    assert reply.key_id == "ini-1"


async def test_concurrent_creates_of_one_key_id_make_one_key(admin: Any) -> None:
    results = await asyncio.gather(
        *(create_key(admin, "initech", "same") for _ in range(16)), return_exceptions=True
    )

    made = [r for r in results if isinstance(r, admin_pb2.CreateApiKeyResponse)]
    assert len(made) == 1
    assert {rich_error(r).field_violations[0] for r in results if r not in made} == {"key_id"}


async def test_list_paginates_every_key_once_without_secrets(admin: Any) -> None:
    created = {}
    for key_id in ("k-3", "k-1", "k-5", "k-2", "k-4"):
        created[key_id] = await create_key(admin, "initech", key_id, team="search")
    await admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(request_id=rid(), tenant_id="initech", key_id="k-4"),
        metadata=AUTH,
    )

    pages, token = [], ""
    while True:
        page = await admin.ListApiKeys(
            admin_pb2.ListApiKeysRequest(tenant_id="initech", page_size=2, page_token=token),
            metadata=AUTH,
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            break

    assert [[k.key_id for k in p.keys] for p in pages] == [["k-1", "k-2"], ["k-3", "k-4"], ["k-5"]]
    listed = {k.key_id: k for p in pages for k in p.keys}
    for key_id, made in created.items():
        expected = admin_pb2.ApiKey()
        expected.CopyFrom(made.key)
        if key_id == "k-4":
            expected.state = admin_pb2.API_KEY_STATE_REVOKED
        assert listed[key_id] == expected
    wire = b"".join(p.SerializeToString() for p in pages)
    for made in created.values():
        assert made.api_key.encode() not in wire
        assert made.api_key[14:].encode() not in wire
        assert hash_key(made.api_key).encode() not in wire
    everything = await admin.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="initech"), metadata=AUTH
    )
    assert [k.key_id for k in everything.keys] == ["k-1", "k-2", "k-3", "k-4", "k-5"]
    assert everything.next_page_token == ""
    nobody = await admin.ListApiKeys(
        admin_pb2.ListApiKeysRequest(tenant_id="nobody"), metadata=AUTH
    )
    assert (list(nobody.keys), nobody.next_page_token) == ([], "")


async def test_revoke_refuses_the_key_promptly_on_every_replica(
    admin: Any, admin_control: Served, start_control: StartControl, tenants_file: Path
) -> None:
    other = await start_control(tenants_file)
    doomed = await create_key(admin, "initech", "doomed")
    kept = await create_key(admin, "initech", "kept")
    for replica in (admin_control, other):  # both replicas now cache the key as valid
        await replica.stub.Admit(admit_request(doomed.api_key))
    request = admin_pb2.RevokeApiKeyRequest(request_id=rid(), tenant_id="initech", key_id="doomed")

    revoked = await admin.RevokeApiKey(request, metadata=AUTH)

    assert revoked.key.state == admin_pb2.API_KEY_STATE_REVOKED
    assert (revoked.key.key_id, revoked.key.prefix) == ("doomed", doomed.key.prefix)
    for replica in (admin_control, other):

        async def refused(replica: Served = replica) -> bool:
            try:
                await replica.stub.Admit(admit_request(doomed.api_key))
            except grpc.aio.AioRpcError as err:
                return rich_error(err).reason == "API_KEY_INVALID"
            return False

        # Well within the 10 s the records are cached: the change was announced.
        await eventually(refused, timeout_s=2)
        await replica.stub.Admit(admit_request(kept.api_key))
    assert await admin.RevokeApiKey(request, metadata=AUTH) == revoked


async def test_a_revoked_key_of_the_tenants_file_stays_revoked_when_a_replica_starts(
    admin: Any, start_control: StartControl, tenants_file: Path, test_keys: ApiKeys
) -> None:
    await admin.RevokeApiKey(
        admin_pb2.RevokeApiKeyRequest(request_id=rid(), tenant_id="acme", key_id="acme-second"),
        metadata=AUTH,
    )

    replica = await start_control(tenants_file)

    error = await refusal(replica.stub.Admit(admit_request(test_keys.acme_second)))
    assert error.reason == "API_KEY_INVALID"


# --- budgets and limits ---------------------------------------------------------------------


async def set_budget(admin: Any, scope: Any, period: Any, limit: int, scope_id: str = "", **kw):
    return await admin.SetBudget(
        admin_pb2.SetBudgetRequest(
            request_id=rid(),
            tenant_id=kw.pop("tenant", "acme"),
            scope=scope,
            scope_id=scope_id,
            period=period,
            limit_usd_micros=limit,
        ),
        metadata=AUTH,
    )


async def set_limits(admin: Any, scope: Any, scope_id: str = "", **kw: Any):
    return await admin.SetLimits(
        admin_pb2.SetLimitsRequest(
            request_id=rid(),
            tenant_id=kw.pop("tenant", "acme"),
            scope=scope,
            scope_id=scope_id,
            **kw,
        ),
        metadata=AUTH,
    )


@pytest.mark.parametrize(
    ("scope", "scope_id", "period", "holder", "period_name"),
    [
        (admin_pb2.SCOPE_TENANT, "", admin_pb2.PERIOD_DAY, "tenant", "day"),
        (admin_pb2.SCOPE_KEY, "acme-main", admin_pb2.PERIOD_MONTH, "key:acme-main", "month"),
        (admin_pb2.SCOPE_TEAM, "search", admin_pb2.PERIOD_TOTAL, "team:search", "total"),
    ],
)
async def test_a_budget_applies_to_the_next_admit_and_zero_removes_it(
    admin: Any,
    admin_control: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    scope: int,
    scope_id: str,
    period: int,
    holder: str,
    period_name: str,
) -> None:
    searcher = await create_key(admin, "acme", "acme-search", team="search")
    key = searcher.api_key if holder.startswith("team:") else test_keys.acme

    reply = await set_budget(admin, scope, period, 700, scope_id)

    assert reply.limit_usd_micros == 700
    error = await refusal(admin_control.stub.Admit(admit_request(key)))  # worst case 750
    assert error.reason == "BUDGET_EXCEEDED"
    assert (error.metadata["scope"], error.metadata["period"]) == (holder, period_name)
    assert error.metadata["limit_usd_micros"] == "700"
    # A smaller request fits.
    small = await admin_control.stub.Admit(admit_request(key, tokens_in=100, tokens_out=100))
    assert small.reserved_usd_micros == 75
    if holder != "tenant":  # a key outside the holder is not affected
        await admin_control.stub.Admit(admit_request(test_keys.acme_second))
    await set_budget(admin, scope, period, 0, scope_id)
    await admin_control.stub.Admit(admit_request(key))


async def test_key_request_limit_applies_to_the_next_admit(
    admin: Any, admin_control: Served, test_keys: ApiKeys
) -> None:
    reply = await set_limits(
        admin, admin_pb2.SCOPE_KEY, "acme-second", requests_per_minute=1, tokens_per_minute=0
    )

    assert (reply.requests_per_minute, reply.tokens_per_minute, reply.max_concurrent) == (1, 0, 0)
    await admin_control.stub.Admit(admit_request(test_keys.acme_second))
    error = await refusal(admin_control.stub.Admit(admit_request(test_keys.acme_second)))
    assert (error.reason, error.metadata["scope"], error.metadata["limit_value"]) == (
        "RATE_LIMITED",
        "key",
        "1",
    )
    await admin_control.stub.Admit(admit_request(test_keys.acme))  # another key of the tenant


async def test_tenant_limits_apply_to_the_next_admit(
    admin: Any, admin_control: Served, test_keys: ApiKeys
) -> None:
    await set_limits(admin, admin_pb2.SCOPE_TENANT, max_concurrent=1)
    request_id = rid()
    first = await admin_control.stub.Admit(admit_request(test_keys.acme, request_id=request_id))
    error = await refusal(admin_control.stub.Admit(admit_request(test_keys.acme_second)))
    assert (error.reason, error.metadata["limit_value"]) == ("CONCURRENCY_LIMITED", "1")
    # Other tenants are not affected.
    await admin_control.stub.Admit(admit_request(test_keys.globex))

    # Setting the tenant's limits again replaces them all (max_concurrent 0: no limit).
    await set_limits(admin, admin_pb2.SCOPE_TENANT, requests_per_minute=1)
    await admin_control.stub.Admit(admit_request(test_keys.acme_second))  # 2 running
    error = await refusal(admin_control.stub.Admit(admit_request(test_keys.acme)))
    assert (error.reason, error.metadata["scope"]) == ("RATE_LIMITED", "tenant")
    assert first.key_id == "acme-main"


# --- usage ----------------------------------------------------------------------------------

USAGE_TENANTS = {
    "initech": {
        "budgets": {"day_usd": "1"},
        "teams": {"search": {"budgets": {"month_usd": "2"}}},
        "keys": [
            {"id": "k1", "team": "search", "budgets": {"total_usd": "3"}},
            {"id": "k2"},
        ],
    }
}


@pytest.fixture
async def usage_control(start_control: StartControl, tmp_path: Path) -> tuple[Served, dict]:
    """A control server with USAGE_TENANTS, after some traffic: k1 settled a request
    (mock-fast, 10+20 tokens, 100 micro-USD) and a cache hit, k2 one request (mock-small,
    1+2 tokens, 30 micro-USD), and k1 has one request running (worst case 750)."""
    spec = yaml.safe_load(yaml.safe_dump(USAGE_TENANTS))
    keys = {}
    for entry in spec["initech"]["keys"]:
        keys[entry["id"]], entry["sha256"] = new_key()
    path = tmp_path / "usage-tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": spec}))
    served = await start_control(path)

    async def run(key_id: str, model: str, used: tuple[int, int], cost: int, hit: bool = False):
        request_id = rid()
        admitted = await served.stub.Admit(
            admit_request(keys[key_id], model, request_id=request_id)
        )
        await served.stub.Settle(
            control_pb2.SettleRequest(
                request_id=request_id,
                tenant_id=admitted.tenant_id,
                key_id=admitted.key_id,
                team_id=admitted.team_id,
                outcome=control_pb2.OUTCOME_SUCCESS,
                model=model,
                usage=common_pb2.Usage(input_tokens=used[0], output_tokens=used[1]),
                cost=common_pb2.Cost(total_usd_micros=cost),
                cache_status=common_pb2.CACHE_STATUS_HIT if hit else common_pb2.CACHE_STATUS_MISS,
            )
        )

    await run("k1", "mock-fast", (10, 20), 100)
    await run("k1", "mock-fast", (0, 0), 0, hit=True)
    await run("k2", "mock-small", (1, 2), 30)
    await served.stub.Admit(admit_request(keys["k1"], "mock-fast"))
    return served, keys


# (scope, scope_id) -> requests, input, output, spent, reserved, cache hits, budget by period
USAGE = {
    (admin_pb2.SCOPE_TENANT, ""): (3, 11, 22, 130, 750, 1, {"day": 1_000_000}),
    (admin_pb2.SCOPE_TEAM, "search"): (2, 10, 20, 100, 750, 1, {"month": 2_000_000}),
    (admin_pb2.SCOPE_KEY, "k1"): (2, 10, 20, 100, 750, 1, {"total": 3_000_000}),
    (admin_pb2.SCOPE_KEY, "k2"): (1, 1, 2, 30, 0, 0, {}),
    (admin_pb2.SCOPE_MODEL, "mock-fast"): (2, 10, 20, 100, 0, 1, {}),
    (admin_pb2.SCOPE_MODEL, "mock-small"): (1, 1, 2, 30, 0, 0, {}),
    (admin_pb2.SCOPE_MODEL, "mock-embed"): (0, 0, 0, 0, 0, 0, {}),
    (admin_pb2.SCOPE_TEAM, "nobody"): (0, 0, 0, 0, 0, 0, {}),
}
PERIODS = {
    "day": admin_pb2.PERIOD_DAY,
    "month": admin_pb2.PERIOD_MONTH,
    "total": admin_pb2.PERIOD_TOTAL,
}


@pytest.mark.parametrize("period", ["day", "month", "total"])
async def test_usage_of_every_scope_and_period(
    usage_control: tuple[Served, dict], period: str
) -> None:
    served, _ = usage_control
    admin = admin_of(served)

    for (scope, scope_id), expected in USAGE.items():
        requests, tokens_in, tokens_out, spent, reserved, hits, budgets = expected
        usage = await admin.GetUsage(
            admin_pb2.GetUsageRequest(
                tenant_id="initech", scope=scope, scope_id=scope_id, period=PERIODS[period]
            ),
            metadata=AUTH,
        )
        assert usage == admin_pb2.GetUsageResponse(
            requests=requests,
            usage=common_pb2.Usage(input_tokens=tokens_in, output_tokens=tokens_out),
            spent_usd_micros=spent,
            reserved_usd_micros=reserved,
            budget_usd_micros=budgets.get(period, 0),
            cache_hits=hits,
        ), (scope, scope_id)


async def test_usage_of_an_unknown_model_is_not_found(admin: Any) -> None:
    error = await refusal(
        admin.GetUsage(
            admin_pb2.GetUsageRequest(
                tenant_id="acme",
                scope=admin_pb2.SCOPE_MODEL,
                scope_id="no-such-model",
                period=admin_pb2.PERIOD_DAY,
            ),
            metadata=AUTH,
        )
    )

    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


# --- breakers -------------------------------------------------------------------------------


async def test_breakers_list_every_model_in_order_with_an_open_one(
    admin: Any, admin_control: Served, models_file: Path
) -> None:
    catalog = load_catalog(models_file)
    failures = catalog.models["mock-error"].breaker.consecutive_failures
    await admin_control.stub.Settle(
        control_pb2.SettleRequest(
            request_id=rid(),
            tenant_id="acme",
            key_id="acme-main",
            outcome=control_pb2.OUTCOME_FAILURE,
            attempts=[control_pb2.Attempt(model="mock-error", error_reason="PROVIDER_UNAVAILABLE")]
            * failures,
        )
    )

    pages, token = [], ""
    while True:
        page = await admin.ListBreakers(
            admin_pb2.ListBreakersRequest(page_size=5, page_token=token), metadata=AUTH
        )
        pages.append(page)
        token = page.next_page_token
        if not token:
            break

    breakers = [b for p in pages for b in p.breakers]
    assert [b.model for b in breakers] == sorted(catalog.models)
    assert all(len(p.breakers) == 5 for p in pages[:-1]) and 1 <= len(pages[-1].breakers) <= 5
    by_model = {b.model: b for b in breakers}
    opened = by_model.pop("mock-error")
    assert opened.state == admin_pb2.BREAKER_STATE_OPEN
    assert opened.consecutive_failures == failures
    cooldown = catalog.models["mock-error"].breaker.cooldown_s
    assert time.time() < opened.open_until.ToMicroseconds() / 1e6 <= time.time() + cooldown + 1
    for breaker in by_model.values():
        assert breaker.state == admin_pb2.BREAKER_STATE_CLOSED, breaker.model
        assert breaker.consecutive_failures == 0
    whole = await admin.ListBreakers(admin_pb2.ListBreakersRequest(), metadata=AUTH)
    assert list(whole.breakers) == breakers and whole.next_page_token == ""
