"""Governance through the control service's real stubs, against a real Redis: budgets, batch
priority, concurrency, reservation expiry, plans, circuit breakers, guardrails and the refusal
of bad input. Each test writes its own tenants (and a catalog with fallbacks and breakers).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import itertools
import math
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml

from services.common.catalog import ModelConfig, load_catalog
from services.common.redis_state import run_pipeline
from services.control import admission
from services.control.admission import periods
from services.control.keys import new_key
from strata.common.v1 import common_pb2
from strata.control.v1 import admin_pb2, admin_pb2_grpc, control_pb2
from tests.conftest import ApiKeys
from tests.grpc.conftest import ADMIN_TOKEN, Served, StartControl
from tests.helpers import (
    RichError,
    bearer,
    eventually,
    held_decisions,
    rich_error,
    state_snapshot,
    usage_record,
    user,
    writes_paused,
)

AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
AUTH = bearer(ADMIN_TOKEN)
EMAIL = "jane.doe@example.com"
Govern = Callable[..., Awaitable[tuple[Served, dict[str, str]]]]


# --- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture(scope="module")
def gov_models(tmp_path_factory: pytest.TempPathFactory, models_file: Path) -> Path:
    """The test catalog plus models with fallbacks, prices and breakers of their own."""
    catalog = yaml.safe_load(models_file.read_text())

    def mock(price_in: str, price_out: str, **extra: Any) -> dict[str, Any]:
        return {
            "provider": "mock",
            "upstream_model": "echo",
            "input_usd_per_million_tokens": price_in,
            "output_usd_per_million_tokens": price_out,
            **extra,
        }

    catalog["models"].update(
        {
            "gov-primary": mock(
                "1",
                "4",
                fallbacks=["gov-backup", "mock-fast"],
                breaker={"consecutive_failures": 3, "cooldown_s": 60},
            ),
            "gov-backup": mock("0.5", "2", breaker={"consecutive_failures": 4}),
            "gov-pricey": mock("3", "15"),
            "gov-solo": mock("1", "4", breaker={"consecutive_failures": 2, "cooldown_s": 30}),
            "gov-flaky": mock(
                "1",
                "4",
                breaker={"consecutive_failures": 1, "cooldown_s": 0.3, "probe_timeout_s": 30},
            ),
        }
    )
    path = tmp_path_factory.mktemp("gov") / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


@functools.cache
def model(models: Path, name: str) -> ModelConfig:
    return load_catalog(models).models[name]


def worst(models: Path, name: str, tokens_in: int, tokens_out: int) -> int:
    """A call's most possible cost in micro-USD, from the catalog's prices per million
    tokens (tokens x USD per million = micro-USD, each part rounded up)."""
    config = model(models, name)
    return math.ceil(tokens_in * config.input_usd_per_million_tokens) + math.ceil(
        tokens_out * config.output_usd_per_million_tokens
    )


def write_tenants(path: Path, spec: dict[str, Any]) -> dict[str, str]:
    """Writes a tenants file, giving each key entry a fresh key; the clear keys by key id."""
    clear = {}
    for tenant in spec.values():
        for entry in tenant.get("keys", []):
            clear[entry["id"]], entry["sha256"] = new_key()
    path.write_text(yaml.safe_dump({"tenants": spec}))
    return clear


@pytest.fixture
def govern(start_control: StartControl, gov_models: Path, tmp_path: Path) -> Govern:
    """Starts a control server on tenants `spec` and the governance catalog."""
    numbers = itertools.count()

    async def start(spec: dict[str, Any], **settings: Any) -> tuple[Served, dict[str, str]]:
        path = tmp_path / f"tenants-{next(numbers)}.yaml"
        keys = write_tenants(path, spec)
        served = await start_control(path, models_file=gov_models, **settings)
        return served, keys

    return start


def admit_request(
    key: str, model: str = "mock-fast", tokens_in: int = 1000, tokens_out: int = 1000, **kw: Any
) -> control_pb2.AdmitRequest:
    return control_pb2.AdmitRequest(
        request_id=kw.pop("request_id", None) or uuid.uuid4().hex,
        api_key=key,
        model=model,
        estimated_input_tokens=tokens_in,
        max_output_tokens=tokens_out,
        **kw,
    )


def settle_request(
    admitted: control_pb2.AdmitResponse,
    request_id: str,
    cost: int = 0,
    tokens_in: int = 0,
    tokens_out: int = 0,
    **kw: Any,
) -> control_pb2.SettleRequest:
    return control_pb2.SettleRequest(
        request_id=request_id,
        tenant_id=admitted.tenant_id,
        key_id=admitted.key_id,
        team_id=admitted.team_id,
        outcome=kw.pop("outcome", control_pb2.OUTCOME_SUCCESS),
        model=kw.pop("model", admitted.plan[0].model if admitted.plan else ""),
        usage=common_pb2.Usage(input_tokens=tokens_in, output_tokens=tokens_out),
        cost=common_pb2.Cost(total_usd_micros=cost),
        cache_status=common_pb2.CACHE_STATUS_MISS,
        admission=kw.pop("admission", admitted.admission),
        **kw,
    )


async def admitted_and_settled(
    served: Served, key: str, alias: str, attempts: list[control_pb2.Attempt], **kw: Any
) -> control_pb2.AdmitResponse:
    """Admits a request for the model `alias` and settles it with these attempts."""
    request = admit_request(key, alias)
    admitted = await served.stub.Admit(request)
    await served.stub.Settle(settle_request(admitted, request.request_id, attempts=attempts, **kw))
    return admitted


async def refusal(call: Awaitable[Any]) -> RichError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return rich_error(caught.value)


def plan_of(reply: control_pb2.AdmitResponse) -> list[str]:
    return [c.model for c in reply.plan]


def usage_of(client: redis.Redis, tenant: str, holder: str, period: str = "total") -> dict:
    raw: Any = client.hgetall(f"strata:{{t:{tenant}}}:usage:{holder}:{period}")
    return {k.decode(): int(v) for k, v in raw.items()}


def reserved_of(client: redis.Redis, tenant: str) -> dict[str, int]:
    raw: Any = client.hgetall(f"strata:{{t:{tenant}}}:reserved")
    return {k.decode(): int(v) for k, v in raw.items()}


def assert_nothing_held(client: redis.Redis, tenant: str) -> None:
    """No running reservation: money, concurrency slots and reservation records all free."""
    assert set(reserved_of(client, tenant).values()) <= {0}
    assert client.zcard(f"strata:{{t:{tenant}}}:pending") == 0
    assert client.hlen(f"strata:{{t:{tenant}}}:reservations") == 0


def findings_stream(client: redis.Redis, tenant: str) -> list[dict[str, str]]:
    entries: Any = client.xrange(f"strata:{{t:{tenant}}}:guardrails")
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def period_key(period: str) -> str:
    """How usage hashes name the current day, month or all time."""
    day, month = periods()
    return {"day": f"d{day}", "month": f"m{month}", "total": "total"}[period]


def seconds_until(period: str) -> float:
    now = dt.datetime.now(dt.UTC)
    if period == "day":
        end = dt.datetime(now.year, now.month, now.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    else:
        end = dt.datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=dt.UTC)
    return (end - now).total_seconds()


def failed(model: str, reason: str = "PROVIDER_UNAVAILABLE") -> control_pb2.Attempt:
    return control_pb2.Attempt(model=model, success=False, error_reason=reason)


def succeeded(model: str) -> control_pb2.Attempt:
    return control_pb2.Attempt(
        model=model, success=True, usage=common_pb2.Usage(input_tokens=5, output_tokens=5)
    )


# --- budgets --------------------------------------------------------------------------------


async def test_reservation_is_the_worst_case_at_the_priciest_candidate(
    govern: Govern, gov_models: Path, redis_db: redis.Redis
) -> None:
    served, keys = await govern(
        {"acme": {"teams": {"search": {}}, "keys": [{"id": "k1", "team": "search"}]}}
    )
    assert worst(gov_models, "mock-fast", 1000, 1000) == 150 + 600  # $0.15 and $0.60 per M

    reply = await served.stub.Admit(
        admit_request(keys["k1"], candidates=["mock-fast", "gov-pricey", "gov-backup"])
    )

    expected = worst(gov_models, "gov-pricey", 1000, 1000)
    assert expected == 3_000 + 15_000
    assert (reply.reserved_usd_micros, reply.reserved_tokens) == (expected, 2000)
    assert reserved_of(redis_db, "acme") == {
        "tenant": expected,
        "team:search": expected,
        "key:k1": expected,
    }
    # Odd token counts round each part up to a whole micro-USD.
    odd = await served.stub.Admit(admit_request(keys["k1"], "mock-fast", 7, 3))
    assert odd.reserved_usd_micros == worst(gov_models, "mock-fast", 7, 3) == 2 + 2


HOLDERS = {
    "tenant": ("tenant", lambda spec: spec["acme"]),
    "team": ("team:search", lambda spec: spec["acme"]["teams"]["search"]),
    "key": ("key:k1", lambda spec: spec["acme"]["keys"][0]),
}


@pytest.mark.parametrize("period", ["day", "month", "total"])
@pytest.mark.parametrize("holder", ["tenant", "team", "key"])
async def test_budget_refuses_a_worst_case_that_does_not_fit_until_settled(
    govern: Govern, gov_models: Path, redis_db: redis.Redis, holder: str, period: str
) -> None:
    cost = worst(gov_models, "mock-fast", 1000, 1000)
    limit = 2 * cost - 1  # one worst case fits, two do not
    spec: dict[str, Any] = {
        "acme": {"teams": {"search": {}}, "keys": [{"id": "k1", "team": "search"}]}
    }
    holder_name, where = HOLDERS[holder]
    where(spec)["budgets"] = {f"{period}_usd": f"{limit / 1e6:.6f}"}
    served, keys = await govern(spec)
    first_id = uuid.uuid4().hex

    first = await served.stub.Admit(admit_request(keys["k1"], request_id=first_id))
    error = await refusal(served.stub.Admit(admit_request(keys["k1"])))

    assert first.reserved_usd_micros == cost
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "BUDGET_EXCEEDED")
    assert error.metadata["scope"] == holder_name
    assert error.metadata["period"] == period
    assert error.metadata["limit_usd_micros"] == str(limit)
    assert error.metadata["remaining_usd_micros"] == str(limit - cost)
    if period == "total":
        assert error.retry_delay_s is None
    else:
        assert error.retry_delay_s is not None
        assert abs(error.retry_delay_s - seconds_until(period)) < 5
    # The refusal reserved nothing more.
    assert reserved_of(redis_db, "acme")[holder_name] == cost

    # Settling gives the unused money back: spent 100 + another worst case fits.
    await served.stub.Settle(settle_request(first, first_id, cost=100, tokens_in=10))
    again = await served.stub.Admit(admit_request(keys["k1"]))
    assert again.reserved_usd_micros == cost
    assert usage_of(redis_db, "acme", holder_name, period_key(period))["spent"] == 100
    assert reserved_of(redis_db, "acme")[holder_name] == cost


async def test_team_budget_blocks_only_that_teams_keys(govern: Govern, gov_models: Path) -> None:
    cost = worst(gov_models, "mock-fast", 1000, 1000)
    served, keys = await govern(
        {
            "acme": {
                "teams": {
                    "search": {"budgets": {"total_usd": f"{(cost + 1) / 1e6:.6f}"}},
                    "ads": {},
                },
                "keys": [
                    {"id": "search-1", "team": "search"},
                    {"id": "search-2", "team": "search"},
                    {"id": "ads-1", "team": "ads"},
                    {"id": "loner"},
                ],
            }
        }
    )

    await served.stub.Admit(admit_request(keys["search-1"]))
    error = await refusal(served.stub.Admit(admit_request(keys["search-2"])))
    assert (error.reason, error.metadata["scope"]) == ("BUDGET_EXCEEDED", "team:search")
    for key_id in ("ads-1", "loner", "ads-1", "loner"):
        reply = await served.stub.Admit(admit_request(keys[key_id]))
        assert reply.key_id == key_id


async def test_key_budget_blocks_only_that_key(govern: Govern, gov_models: Path) -> None:
    cost = worst(gov_models, "mock-fast", 1000, 1000)
    served, keys = await govern(
        {
            "acme": {
                "teams": {"search": {}},
                "keys": [
                    {
                        "id": "capped",
                        "team": "search",
                        "budgets": {"day_usd": f"{(cost + 1) / 1e6:.6f}"},
                    },
                    {"id": "sibling", "team": "search"},
                ],
            }
        }
    )

    await served.stub.Admit(admit_request(keys["capped"]))
    error = await refusal(served.stub.Admit(admit_request(keys["capped"])))
    assert (error.reason, error.metadata["scope"], error.metadata["period"]) == (
        "BUDGET_EXCEEDED",
        "key:capped",
        "day",
    )
    assert error.metadata["remaining_usd_micros"] == "1"
    for _ in range(3):
        assert (await served.stub.Admit(admit_request(keys["sibling"]))).key_id == "sibling"


# --- batch priority -------------------------------------------------------------------------


async def test_batch_is_refused_before_interactive_on_a_request_limit(govern: Govern) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1", "requests_per_minute": 10}]}})
    batch: dict[str, Any] = {"priority": common_pb2.PRIORITY_BATCH}

    for _ in range(8):  # BATCH_SHARE 0.8 of 10
        await served.stub.Admit(admit_request(keys["k1"], **batch))
    error = await refusal(served.stub.Admit(admit_request(keys["k1"], **batch)))
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert (error.metadata["scope"], error.metadata["limit"]) == ("key", "requests_per_minute")
    assert error.retry_delay_s is not None and error.retry_delay_s > 0

    # The rest of the minute's allowance is kept for interactive requests.
    for priority in (common_pb2.PRIORITY_INTERACTIVE, common_pb2.PRIORITY_UNSPECIFIED):
        await served.stub.Admit(admit_request(keys["k1"], priority=priority))
    error = await refusal(served.stub.Admit(admit_request(keys["k1"])))
    assert error.reason == "RATE_LIMITED"


async def test_batch_is_refused_before_interactive_on_a_budget(
    govern: Govern, gov_models: Path
) -> None:
    cost = worst(gov_models, "mock-fast", 1000, 1000)
    limit = cost + cost // 10  # the worst case fits the whole budget, not 80% of it
    served, keys = await govern(
        {"acme": {"keys": [{"id": "k1", "budgets": {"total_usd": f"{limit / 1e6:.6f}"}}]}}
    )

    error = await refusal(
        served.stub.Admit(admit_request(keys["k1"], priority=common_pb2.PRIORITY_BATCH))
    )
    assert (error.reason, error.metadata["scope"]) == ("BUDGET_EXCEEDED", "key:k1")
    reply = await served.stub.Admit(admit_request(keys["k1"]))
    assert reply.reserved_usd_micros == cost


async def test_batch_is_refused_before_interactive_on_concurrency(govern: Govern) -> None:
    served, keys = await govern({"acme": {"limits": {"max_concurrent": 5}, "keys": [{"id": "k"}]}})
    batch: dict[str, Any] = {"priority": common_pb2.PRIORITY_BATCH}

    for _ in range(4):
        await served.stub.Admit(admit_request(keys["k"], **batch))
    error = await refusal(served.stub.Admit(admit_request(keys["k"], **batch)))
    assert error.reason == "CONCURRENCY_LIMITED"
    await served.stub.Admit(admit_request(keys["k"]))
    assert (await refusal(served.stub.Admit(admit_request(keys["k"])))).reason == (
        "CONCURRENCY_LIMITED"
    )


# --- concurrency ----------------------------------------------------------------------------


async def test_concurrency_limit_refuses_with_a_delay_until_a_settle_frees_a_slot(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern(
        {"acme": {"limits": {"max_concurrent": 2}, "keys": [{"id": "k1"}, {"id": "k2"}]}}
    )
    first_id = uuid.uuid4().hex
    first = await served.stub.Admit(admit_request(keys["k1"], request_id=first_id))
    await served.stub.Admit(admit_request(keys["k2"]))

    error = await refusal(served.stub.Admit(admit_request(keys["k1"])))
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "CONCURRENCY_LIMITED")
    assert error.metadata["limit"] == "max_concurrent"
    assert error.metadata["limit_value"] == "2"
    assert error.retry_delay_s == 1.0
    # Admitting a running request again takes no other slot.
    await served.stub.Admit(admit_request(keys["k1"], request_id=first_id))
    assert redis_db.zcard("strata:{t:acme}:pending") == 2

    await served.stub.Settle(settle_request(first, first_id, cost=10))
    await served.stub.Admit(admit_request(keys["k2"]))
    assert (await refusal(served.stub.Admit(admit_request(keys["k2"])))).reason == (
        "CONCURRENCY_LIMITED"
    )


# --- reservation expiry ---------------------------------------------------------------------


async def test_an_unsettled_reservation_expires_into_a_charge_of_its_worst_case(
    govern: Govern, gov_models: Path, redis_db: redis.Redis
) -> None:
    served, keys = await govern(
        {
            "acme": {
                "limits": {"max_concurrent": 1},
                "teams": {"search": {}},
                "keys": [{"id": "k1", "team": "search"}, {"id": "k2"}],
            }
        },
        reservation_ttl_s=1,
    )
    cost = worst(gov_models, "mock-fast", 1000, 1000)
    request_id = uuid.uuid4().hex
    admitted = await served.stub.Admit(admit_request(keys["k1"], request_id=request_id))
    assert (await refusal(served.stub.Admit(admit_request(keys["k2"])))).reason == (
        "CONCURRENCY_LIMITED"
    )

    charged = await eventually(lambda: usage_record(redis_db, "acme", "k1").get("outcome_expired"))

    assert charged == 1
    for holder in ("tenant", "team:search", "key:k1"):
        usage = usage_of(redis_db, "acme", holder)
        assert (usage["spent"], usage["requests"], usage["outcome_expired"]) == (cost, 1, 1)
        assert usage_of(redis_db, "acme", holder, period_key("day"))["spent"] == cost
    assert usage_of(redis_db, "acme", "tenant")["model:mock-fast:spent"] == cost
    assert_nothing_held(redis_db, "acme")
    assert int(redis_db.hget("strata:{t:acme}:expired", request_id) or 0) == cost
    # The slot is free again.
    other_id = uuid.uuid4().hex
    other = await served.stub.Admit(admit_request(keys["k2"], request_id=other_id))
    await served.stub.Settle(settle_request(other, other_id, cost=0))

    # A late settlement corrects the charge to the real cost, without a second request.
    late = settle_request(admitted, request_id, cost=120, tokens_in=100, tokens_out=50)
    assert (await served.stub.Settle(late)).applied
    assert not (await served.stub.Settle(late)).applied
    for holder in ("tenant", "team:search", "key:k1"):
        usage = usage_of(redis_db, "acme", holder)
        assert usage["spent"] == 120  # (k2's request cost nothing)
        assert (usage["input_tokens"], usage["output_tokens"]) == (100, 50)
        assert usage["outcome_expired"] == 1
    key_usage = usage_record(redis_db, "acme", "k1")
    assert key_usage["requests"] == 1
    assert "outcome_success" not in key_usage
    assert usage_record(redis_db, "acme")["requests"] == 2  # k1's expired one and k2's
    assert not redis_db.hexists("strata:{t:acme}:expired", request_id)
    assert_nothing_held(redis_db, "acme")


async def test_a_request_id_admitted_again_after_settling_is_charged_again_and_counted_once(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    request = admit_request(keys["k1"])
    first = await served.stub.Admit(request)
    first_settle = settle_request(
        first, request.request_id, cost=30, tokens_out=3, outcome=control_pb2.OUTCOME_FAILURE
    )
    assert (await served.stub.Settle(first_settle)).applied

    # The client retries the failed request under the same id: a new admission.
    retry = await served.stub.Admit(request)
    assert (first.admission, retry.admission) == (1, 2)
    assert (await served.stub.Admit(request)).admission == 2  # still held: the same one
    # A late repeat of the first settlement neither settles the retry nor charges twice.
    assert not (await served.stub.Settle(first_settle)).applied
    assert redis_db.hlen("strata:{t:acme}:reservations") == 1
    done = settle_request(retry, request.request_id, cost=50, tokens_out=5)
    assert (await served.stub.Settle(done)).applied
    assert not (await served.stub.Settle(done)).applied

    usage = usage_record(redis_db, "acme", "k1")
    assert (usage["spent"], usage["output_tokens"], usage["requests"]) == (80, 8, 1)
    assert (usage["outcome_failure"], usage["outcome_success"]) == (1, 1)
    assert_nothing_held(redis_db, "acme")


# --- plans ----------------------------------------------------------------------------------


async def test_plan_is_the_model_and_its_fallbacks_in_order(
    govern: Govern, gov_models: Path
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    assert model(gov_models, "gov-primary").fallbacks == ["gov-backup", "mock-fast"]

    reply = await served.stub.Admit(admit_request(keys["k1"], "gov-primary"))

    assert [(c.model, c.probe) for c in reply.plan] == [
        ("gov-primary", False),
        ("gov-backup", False),
        ("mock-fast", False),
    ]
    assert reply.reserved_usd_micros == worst(gov_models, "gov-primary", 1000, 1000)
    solo = await served.stub.Admit(admit_request(keys["k1"], "mock-small"))
    assert plan_of(solo) == ["mock-small"]


async def test_candidates_replace_the_models_plan(govern: Govern, gov_models: Path) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})

    reply = await served.stub.Admit(
        admit_request(
            keys["k1"], "gov-primary", candidates=["mock-fast", "gov-backup", "mock-fast"]
        )
    )

    assert plan_of(reply) == ["mock-fast", "gov-backup"]
    assert reply.reserved_usd_micros == worst(gov_models, "gov-backup", 1000, 1000)


@pytest.mark.parametrize(
    ("model_name", "candidates"),
    [("no-such-model", []), ("gov-primary", ["mock-fast", "no-such-model"])],
)
async def test_unknown_model_or_candidate_is_not_found_and_reserves_nothing(
    govern: Govern, redis_db: redis.Redis, model_name: str, candidates: list[str]
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    before = state_snapshot(redis_db)

    error = await refusal(
        served.stub.Admit(admit_request(keys["k1"], model_name, candidates=candidates))
    )

    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert error.metadata["model"] == "no-such-model"
    assert state_snapshot(redis_db) == before


async def test_cost_ceiling_drops_candidates_whose_worst_case_is_above_it(
    govern: Govern, gov_models: Path, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    backup = worst(gov_models, "gov-backup", 1000, 1000)
    assert worst(gov_models, "gov-primary", 1000, 1000) > backup

    reply = await served.stub.Admit(
        admit_request(keys["k1"], "gov-primary", max_cost_usd_micros=backup)
    )

    assert plan_of(reply) == ["gov-backup", "mock-fast"]
    assert reply.reserved_usd_micros == backup


async def test_cost_ceiling_below_every_candidate_is_refused_and_reserves_nothing(
    govern: Govern, gov_models: Path, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    cheapest = worst(gov_models, "mock-fast", 1000, 1000)
    before = state_snapshot(redis_db)

    error = await refusal(
        served.stub.Admit(
            admit_request(keys["k1"], "gov-primary", max_cost_usd_micros=cheapest - 1)
        )
    )

    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "COST_CEILING_EXCEEDED")
    assert error.metadata == {
        "ceiling_usd_micros": str(cheapest - 1),
        "cheapest_usd_micros": str(cheapest),
    }
    assert state_snapshot(redis_db) == before


# --- circuit breakers -----------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["PROVIDER_UNAVAILABLE", "UPSTREAM_TIMEOUT"])
async def test_failures_in_a_row_open_the_breaker_and_plans_skip_the_model(
    govern: Govern, gov_models: Path, redis_db: redis.Redis, reason: str
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    needed = model(gov_models, "gov-primary").breaker.consecutive_failures
    attempts = [failed("gov-primary", reason), succeeded("gov-backup")]

    for _ in range(needed - 1):
        admitted = await admitted_and_settled(
            served, keys["k1"], "gov-primary", attempts, model="gov-backup"
        )
        assert plan_of(admitted)[0] == "gov-primary"
    await admitted_and_settled(served, keys["k1"], "gov-primary", attempts, model="gov-backup")

    reply = await served.stub.Admit(admit_request(keys["k1"], "gov-primary"))
    assert plan_of(reply) == ["gov-backup", "mock-fast"]
    # (The worst case is priced before the breakers answer, over every candidate: safe side.)
    assert reply.reserved_usd_micros == worst(gov_models, "gov-primary", 1000, 1000)
    assert redis_db.hget("strata:{m:gov-primary}:breaker", "state") == b"open"


@pytest.mark.parametrize(
    ("reason", "outcome"),
    [
        ("CONTENT_FILTERED", control_pb2.OUTCOME_FAILURE),
        ("CONTEXT_LENGTH_EXCEEDED", control_pb2.OUTCOME_FAILURE),
        ("UPSTREAM_REJECTED", control_pb2.OUTCOME_FAILURE),
        ("CANCELLED", control_pb2.OUTCOME_CANCELLED),
        ("", control_pb2.OUTCOME_CANCELLED),
    ],
)
async def test_failures_that_are_not_the_models_fault_never_open_the_breaker(
    govern: Govern, gov_models: Path, redis_db: redis.Redis, reason: str, outcome: int
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    needed = model(gov_models, "gov-primary").breaker.consecutive_failures

    for _ in range(needed + 2):
        await admitted_and_settled(
            served, keys["k1"], "gov-primary", [failed("gov-primary", reason)], outcome=outcome
        )

    reply = await served.stub.Admit(admit_request(keys["k1"], "gov-primary"))
    assert plan_of(reply) == ["gov-primary", "gov-backup", "mock-fast"]
    assert int(redis_db.hget("strata:{m:gov-primary}:breaker", "consecutive") or 0) == 0


async def test_a_success_resets_the_failures_in_a_row(govern: Govern, gov_models: Path) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    needed = model(gov_models, "gov-primary").breaker.consecutive_failures

    for attempts in (
        [failed("gov-primary")] * (needed - 1)
        + [succeeded("gov-primary")]
        + [failed("gov-primary")] * (needed - 1)
    ):
        await admitted_and_settled(served, keys["k1"], "gov-primary", [attempts])

    reply = await served.stub.Admit(admit_request(keys["k1"], "gov-primary"))
    assert plan_of(reply)[0] == "gov-primary"


async def test_every_candidate_skipped_is_unavailable_and_leaves_no_reservation(
    govern: Govern, gov_models: Path, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"limits": {"max_concurrent": 1}, "keys": [{"id": "k1"}]}})
    breaker = model(gov_models, "gov-solo").breaker
    for _ in range(breaker.consecutive_failures):
        await admitted_and_settled(served, keys["k1"], "gov-solo", [failed("gov-solo")])

    error = await refusal(served.stub.Admit(admit_request(keys["k1"], "gov-solo")))

    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "MODELS_UNAVAILABLE")
    assert error.metadata["gov-solo"] == "breaker_open"
    assert error.retry_delay_s is not None
    assert breaker.cooldown_s - 5 < error.retry_delay_s <= breaker.cooldown_s
    assert_nothing_held(redis_db, "acme")
    # The concurrency slot was given back: another model is admitted at once.
    await served.stub.Admit(admit_request(keys["k1"], "mock-fast"))


async def test_after_the_cooldown_one_request_probes_and_its_success_closes_the_breaker(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    await admitted_and_settled(served, keys["k1"], "gov-flaky", [failed("gov-flaky")])
    assert (await refusal(served.stub.Admit(admit_request(keys["k1"], "gov-flaky")))).reason == (
        "MODELS_UNAVAILABLE"
    )

    async def admitted_probe() -> tuple[str, control_pb2.AdmitResponse] | None:
        request = admit_request(keys["k1"], "gov-flaky")
        try:
            return request.request_id, await served.stub.Admit(request)
        except grpc.aio.AioRpcError:
            return None

    probe_id, probe = await eventually(admitted_probe, timeout_s=5)
    assert [(c.model, c.probe) for c in probe.plan] == [("gov-flaky", True)]
    # While the probe runs, nobody else may try the model.
    error = await refusal(served.stub.Admit(admit_request(keys["k1"], "gov-flaky")))
    assert (error.reason, error.metadata["gov-flaky"]) == ("MODELS_UNAVAILABLE", "breaker_open")

    await served.stub.Settle(settle_request(probe, probe_id, attempts=[succeeded("gov-flaky")]))
    for _ in range(2):
        reply = await served.stub.Admit(admit_request(keys["k1"], "gov-flaky"))
        assert [(c.model, c.probe) for c in reply.plan] == [("gov-flaky", False)]
    assert redis_db.hget("strata:{m:gov-flaky}:breaker", "state") == b"closed"


async def test_a_refused_request_does_not_take_the_probe_of_a_half_open_breaker(
    govern: Govern, gov_models: Path
) -> None:
    served, keys = await govern(
        {"acme": {"keys": [{"id": "tight", "requests_per_minute": 1}, {"id": "free"}]}}
    )
    await admitted_and_settled(served, keys["tight"], "gov-flaky", [failed("gov-flaky")])
    await asyncio.sleep(model(gov_models, "gov-flaky").breaker.cooldown_s + 0.1)

    # The cool-down is over, but this key's request limit refuses the request.
    error = await refusal(served.stub.Admit(admit_request(keys["tight"], "gov-flaky")))
    assert error.reason == "RATE_LIMITED"

    reply = await served.stub.Admit(admit_request(keys["free"], "gov-flaky"))
    assert [(c.model, c.probe) for c in reply.plan] == [("gov-flaky", True)]


async def test_a_probe_taken_by_an_admit_cut_while_redis_decided_is_given_back(
    govern: Govern, gov_models: Path, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}}, redis_timeout_s=5.0)
    await admitted_and_settled(served, keys["k1"], "gov-flaky", [failed("gov-flaky")])
    await asyncio.sleep(model(gov_models, "gov-flaky").breaker.cooldown_s + 0.1)
    with writes_paused(redis_db):
        with pytest.raises(grpc.aio.AioRpcError):
            await served.stub.Admit(admit_request(keys["k1"], "gov-flaky"), timeout=0.3)
        await held_decisions(redis_db, 1)
        await asyncio.sleep(0.3)  # the server's side of the deadline cancels the handler
    # The cut call took the probe, then it was settled and the probe given back (else
    # nobody could try the model for its probe timeout, 30 s).

    async def probes() -> bool:
        try:
            reply = await served.stub.Admit(admit_request(keys["k1"], "gov-flaky"))
        except grpc.aio.AioRpcError:
            return False
        return [(c.model, c.probe) for c in reply.plan] == [("gov-flaky", True)]

    await eventually(probes, timeout_s=5)


async def test_a_request_refused_as_unavailable_can_be_retried_and_settled(
    govern: Govern, gov_models: Path, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    await admitted_and_settled(served, keys["k1"], "gov-flaky", [failed("gov-flaky")])
    request = admit_request(keys["k1"], "gov-flaky")
    assert (await refusal(served.stub.Admit(request))).reason == "MODELS_UNAVAILABLE"

    async def admitted() -> control_pb2.AdmitResponse | None:
        try:
            return await served.stub.Admit(request)  # the client's retry, same request id
        except grpc.aio.AioRpcError:
            return None

    reply = await eventually(admitted, timeout_s=5)
    settled = await served.stub.Settle(
        settle_request(reply, request.request_id, cost=42, attempts=[succeeded("gov-flaky")])
    )
    assert settled.applied
    assert_nothing_held(redis_db, "acme")


async def test_a_retry_refused_as_unavailable_again_leaves_no_reservation(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    for _ in range(2):
        await admitted_and_settled(served, keys["k1"], "gov-solo", [failed("gov-solo")])
    request = admit_request(keys["k1"], "gov-solo")

    for _ in range(2):  # the client retries the same request
        assert (await refusal(served.stub.Admit(request))).reason == "MODELS_UNAVAILABLE"

    assert_nothing_held(redis_db, "acme")


async def test_a_short_burst_still_lets_the_steady_rate_through(govern: Govern) -> None:
    served, keys = await govern(
        {"acme": {"limits": {"burst_s": 10}, "keys": [{"id": "k1", "requests_per_minute": 3}]}}
    )

    reply = await served.stub.Admit(admit_request(keys["k1"]))

    assert reply.key_id == "k1"


async def test_settle_without_team_id_still_charges_the_keys_team(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern(
        {"acme": {"teams": {"search": {}}, "keys": [{"id": "k1", "team": "search"}]}}
    )
    request_id = uuid.uuid4().hex
    admitted = await served.stub.Admit(admit_request(keys["k1"], request_id=request_id))
    settle = settle_request(admitted, request_id, cost=500, tokens_in=10)
    settle.ClearField("team_id")

    await served.stub.Settle(settle)

    assert usage_of(redis_db, "acme", "key:k1")["spent"] == 500
    assert usage_of(redis_db, "acme", "team:search").get("spent") == 500


async def test_a_settle_batch_settles_every_tenant_in_one_redis_round_trip(
    govern: Govern, gov_models: Path, redis_db: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, keys = await govern(
        {
            "acme": {"teams": {"search": {}}, "keys": [{"id": "k1", "team": "search"}]},
            "globex": {"keys": [{"id": "g1"}]},
        }
    )
    needed = model(gov_models, "gov-primary").breaker.consecutive_failures
    batch = control_pb2.SettleBatchRequest()
    for key, cost in [("k1", 500)] + [("g1", 30)] * (needed - 2):
        request = admit_request(keys[key], "gov-primary")
        admitted = await served.stub.Admit(request)
        entry = batch.entries.add()
        entry.settlement.CopyFrom(
            settle_request(admitted, request.request_id, cost, attempts=[failed("gov-primary")])
        )
    # Without its team, acme's entry goes again once Redis names the holders: its breaker
    # record must not.
    batch.entries[0].settlement.ClearField("team_id")
    pipelines: list[int] = []

    async def counted(client: Any, build: Callable[[Any], None], scripts: Any) -> list[Any]:
        pipelines.append(1)
        return await run_pipeline(client, build, scripts)

    monkeypatch.setattr(admission, "run_pipeline", counted)

    reply = await served.stub.SettleBatch(batch)

    assert list(reply.applied) == [True] * (needed - 1)
    assert len(pipelines) == 2  # every entry, then acme's again for its team
    assert usage_of(redis_db, "acme", "team:search")["spent"] == 500
    assert usage_of(redis_db, "globex", "tenant")["spent"] == 30 * (needed - 2)
    assert int(redis_db.hget("strata:{m:gov-primary}:breaker", "consecutive") or 0) == needed - 1
    assert_nothing_held(redis_db, "acme")
    assert_nothing_held(redis_db, "globex")


# --- guardrails -----------------------------------------------------------------------------


async def test_personal_data_is_redacted_and_the_finding_recorded(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    request = admit_request(
        keys["k1"],
        messages=[
            common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content="Be brief."),
            user(f"Write to {EMAIL} about the invoice."),
        ],
    )

    reply = await served.stub.Admit(request)

    assert reply.guardrail_profile == "default"
    assert [(m.role, m.content) for m in reply.redacted_messages] == [
        (common_pb2.ROLE_SYSTEM, "Be brief."),
        (common_pb2.ROLE_USER, "Write to [REDACTED:EMAIL] about the invoice."),
    ]
    assert list(reply.guardrail_findings) == [
        control_pb2.GuardrailFinding(
            rule="pii.email", action=control_pb2.GUARDRAIL_ACTION_REDACT, message_index=1
        )
    ]
    assert findings_stream(redis_db, "acme") == [
        {
            "request_id": request.request_id,
            "phase": "input",
            "rule": "pii.email",
            "action": "GUARDRAIL_ACTION_REDACT",
            "message_index": "1",
        }
    ]


async def test_a_clean_conversation_has_no_findings_and_no_redaction(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})

    reply = await served.stub.Admit(admit_request(keys["k1"], messages=[user("Hello there.")]))

    assert not reply.guardrail_findings and not reply.redacted_messages
    assert findings_stream(redis_db, "acme") == []


async def test_a_secret_blocks_the_request_and_reserves_nothing(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1", "requests_per_minute": 1}]}})
    stream = "strata:{t:acme}:guardrails"
    before = state_snapshot(redis_db)
    request = admit_request(keys["k1"], messages=[user("hi"), user(f"my key is {AWS_KEY}")])

    error = await refusal(served.stub.Admit(request))

    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "GUARDRAIL_BLOCKED")
    assert error.metadata == {"rule": "secret.aws_access_key", "phase": "input"}
    assert AWS_KEY not in error.message
    after = state_snapshot(redis_db)
    assert {k: v for k, v in after.items() if k != stream.encode()} == before
    entries = findings_stream(redis_db, "acme")
    assert entries == [
        {
            "request_id": request.request_id,
            "phase": "input",
            "rule": "secret.aws_access_key",
            "action": "GUARDRAIL_ACTION_BLOCK",
            "message_index": "1",
        }
    ]
    assert AWS_KEY not in str(entries)
    # Not even the key's one request per minute was used.
    await served.stub.Admit(admit_request(keys["k1"], messages=[user("hi")]))


async def test_the_request_and_tenant_choose_the_guardrail_profile(govern: Govern) -> None:
    served, keys = await govern(
        {
            "strict-co": {"guardrail_profile": "strict", "keys": [{"id": "s1"}]},
            "acme": {"keys": [{"id": "k1"}]},
        }
    )

    # The tenant's profile (strict) blocks personal data instead of redacting it.
    error = await refusal(served.stub.Admit(admit_request(keys["s1"], messages=[user(EMAIL)])))
    assert (error.reason, error.metadata["rule"]) == ("GUARDRAIL_BLOCKED", "pii.email")
    # The request's profile wins: "off" lets even a secret through.
    reply = await served.stub.Admit(
        admit_request(keys["k1"], messages=[user(AWS_KEY)], guardrail_profile="off")
    )
    assert reply.guardrail_profile == "off"
    assert not reply.guardrail_findings and not reply.redacted_messages


async def test_unknown_guardrail_profile_is_invalid_and_changes_nothing(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    before = state_snapshot(redis_db)

    error = await refusal(
        served.stub.Admit(admit_request(keys["k1"], guardrail_profile="no-such-profile"))
    )

    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == ["guardrail_profile"]
    assert state_snapshot(redis_db) == before


async def test_check_output_blocks_a_secret_and_records_it(
    govern: Govern, redis_db: redis.Redis
) -> None:
    served, _ = await govern({"acme": {"keys": [{"id": "k1"}]}})

    reply = await served.stub.CheckOutput(
        control_pb2.CheckOutputRequest(
            request_id="r-secret", tenant_id="acme", text=f"Use {AWS_KEY} to log in."
        )
    )

    assert reply.blocked
    assert list(reply.findings) == [
        control_pb2.GuardrailFinding(
            rule="secret.aws_access_key",
            action=control_pb2.GUARDRAIL_ACTION_BLOCK,
            message_index=-1,
        )
    ]
    assert findings_stream(redis_db, "acme") == [
        {
            "request_id": "r-secret",
            "phase": "output",
            "rule": "secret.aws_access_key",
            "action": "GUARDRAIL_ACTION_BLOCK",
            "message_index": "-1",
        }
    ]


async def test_check_output_redacts_personal_data(govern: Govern, redis_db: redis.Redis) -> None:
    served, _ = await govern({"acme": {"keys": [{"id": "k1"}]}})

    reply = await served.stub.CheckOutput(
        control_pb2.CheckOutputRequest(
            request_id="r-email", tenant_id="acme", text=f"Mail {EMAIL}, thanks."
        )
    )
    clean = await served.stub.CheckOutput(
        control_pb2.CheckOutputRequest(request_id="r-clean", tenant_id="acme", text="All good.")
    )

    assert not reply.blocked
    assert reply.redacted_text == "Mail [REDACTED:EMAIL], thanks."
    assert [(f.rule, f.action) for f in reply.findings] == [
        ("pii.email", control_pb2.GUARDRAIL_ACTION_REDACT)
    ]
    assert (clean.blocked, list(clean.findings), clean.redacted_text) == (False, [], "")
    entries = findings_stream(redis_db, "acme")
    assert [(e["request_id"], e["phase"], e["rule"]) for e in entries] == [
        ("r-email", "output", "pii.email")
    ]
    assert EMAIL not in str(entries)


async def test_settle_records_the_output_findings(govern: Govern, redis_db: redis.Redis) -> None:
    served, keys = await govern({"acme": {"keys": [{"id": "k1"}]}})
    request_id = uuid.uuid4().hex
    admitted = await served.stub.Admit(admit_request(keys["k1"], request_id=request_id))
    findings = [
        control_pb2.GuardrailFinding(
            rule="pii.phone", action=control_pb2.GUARDRAIL_ACTION_REDACT, message_index=-1
        ),
        control_pb2.GuardrailFinding(
            rule="injection.ignore_instructions",
            action=control_pb2.GUARDRAIL_ACTION_FLAG,
            message_index=-1,
        ),
    ]

    await served.stub.Settle(settle_request(admitted, request_id, guardrail_findings=findings))

    assert [
        (e["request_id"], e["phase"], e["rule"], e["action"])
        for e in findings_stream(redis_db, "acme")
    ] == [
        (request_id, "output", "pii.phone", "GUARDRAIL_ACTION_REDACT"),
        (request_id, "output", "injection.ignore_instructions", "GUARDRAIL_ACTION_FLAG"),
    ]


# --- bad input to every RPC -----------------------------------------------------------------


def _admit(**change: Any) -> Callable[[str], control_pb2.AdmitRequest]:
    def build(key: str) -> control_pb2.AdmitRequest:
        request = admit_request(key, "mock-small", 10, 20)
        for name, value in change.items():
            setattr(request, name, value)
        return request

    return build


def _settle(
    attempts: list[control_pb2.Attempt] | None = None, **change: Any
) -> Callable[[str], control_pb2.SettleRequest]:
    def build(_: str) -> control_pb2.SettleRequest:
        request = control_pb2.SettleRequest(
            request_id="r1",
            tenant_id="acme",
            key_id="acme-main",
            outcome=control_pb2.OUTCOME_SUCCESS,
            model="mock-small",
            usage=common_pb2.Usage(input_tokens=1, output_tokens=1),
            cost=common_pb2.Cost(total_usd_micros=1),
            cache_status=common_pb2.CACHE_STATUS_MISS,
            attempts=attempts or [control_pb2.Attempt(model="mock-small", success=True)],
        )
        for path, value in change.items():
            target: Any = request
            *parents, name = path.split("__")
            for parent in parents:
                target = getattr(target, parent)
            setattr(target, name, value)
        return request

    return build


def _check(**change: Any) -> Callable[[str], control_pb2.CheckOutputRequest]:
    def build(_: str) -> control_pb2.CheckOutputRequest:
        fields = {"request_id": "r1", "tenant_id": "acme", "text": "hello", **change}
        return control_pb2.CheckOutputRequest(**fields)

    return build


def _admin(message: Any, **fields: Any) -> Callable[[str], Any]:
    base = {"request_id": "adm-1"} if "request_id" in message.DESCRIPTOR.fields_by_name else {}
    return lambda _: message(**{**base, **fields})


T, TEAM, KEY, MODEL = (
    admin_pb2.SCOPE_TENANT,
    admin_pb2.SCOPE_TEAM,
    admin_pb2.SCOPE_KEY,
    admin_pb2.SCOPE_MODEL,
)
DAY = admin_pb2.PERIOD_DAY
BAD_INPUT = [
    ("Admit", _admit(priority=7), "priority"),
    ("Admit", _admit(max_cost_usd_micros=0), "max_cost_usd_micros"),
    ("Admit", _admit(max_cost_usd_micros=-5), "max_cost_usd_micros"),
    ("Admit", _admit(request_id="x" * 129), "request_id"),
    ("Settle", _settle(request_id=""), "request_id"),
    ("Settle", _settle(request_id="a/b"), "request_id"),
    ("Settle", _settle(tenant_id=""), "tenant_id"),
    ("Settle", _settle(key_id=""), "key_id"),
    ("Settle", _settle(outcome=control_pb2.OUTCOME_UNSPECIFIED), "outcome"),
    ("Settle", _settle(outcome=9), "outcome"),
    ("Settle", _settle(usage__input_tokens=-1), "usage"),
    ("Settle", _settle(usage__output_tokens=-1), "usage"),
    ("Settle", _settle(cost__total_usd_micros=-1), "usage"),
    (
        "Settle",
        _settle([control_pb2.Attempt(error_reason="BAD_UPSTREAM_RESPONSE")]),
        "attempts[0].model",
    ),
    ("CheckOutput", _check(request_id=""), "request_id"),
    ("CheckOutput", _check(tenant_id=""), "tenant_id"),
    ("CheckOutput", _check(guardrail_profile="no-such-profile"), "guardrail_profile"),
    (
        "CreateApiKey",
        _admin(admin_pb2.CreateApiKeyRequest, request_id="", tenant_id="x"),
        "request_id",
    ),
    ("CreateApiKey", _admin(admin_pb2.CreateApiKeyRequest, tenant_id="Bad"), "tenant_id"),
    ("CreateApiKey", _admin(admin_pb2.CreateApiKeyRequest, tenant_id=""), "tenant_id"),
    ("CreateApiKey", _admin(admin_pb2.CreateApiKeyRequest, tenant_id="x", key_id="K 1"), "key_id"),
    (
        "CreateApiKey",
        _admin(admin_pb2.CreateApiKeyRequest, tenant_id="x", team_id="{t}"),
        "team_id",
    ),
    ("ListApiKeys", _admin(admin_pb2.ListApiKeysRequest), "tenant_id"),
    (
        "ListApiKeys",
        _admin(admin_pb2.ListApiKeysRequest, tenant_id="acme", page_size=-1),
        "page_size",
    ),
    (
        "ListApiKeys",
        _admin(admin_pb2.ListApiKeysRequest, tenant_id="acme", page_token="?!"),
        "page_token",
    ),
    ("RevokeApiKey", _admin(admin_pb2.RevokeApiKeyRequest, tenant_id="acme"), "key_id"),
    ("RevokeApiKey", _admin(admin_pb2.RevokeApiKeyRequest, key_id="acme-main"), "tenant_id"),
    (
        "RevokeApiKey",
        _admin(admin_pb2.RevokeApiKeyRequest, tenant_id="acme", key_id="nope"),
        "key_id",
    ),
    (
        "RevokeApiKey",
        _admin(admin_pb2.RevokeApiKeyRequest, request_id="", tenant_id="acme", key_id="acme-main"),
        "request_id",
    ),
    ("SetBudget", _admin(admin_pb2.SetBudgetRequest, tenant_id="acme", scope=T), "period"),
    (
        "SetBudget",
        _admin(
            admin_pb2.SetBudgetRequest, tenant_id="acme", scope=T, period=DAY, limit_usd_micros=-1
        ),
        "limit_usd_micros",
    ),
    ("SetBudget", _admin(admin_pb2.SetBudgetRequest, tenant_id="acme", period=DAY), "scope"),
    (
        "SetBudget",
        _admin(
            admin_pb2.SetBudgetRequest,
            tenant_id="acme",
            scope=MODEL,
            scope_id="mock-small",
            period=DAY,
        ),
        "scope",
    ),
    (
        "SetBudget",
        _admin(admin_pb2.SetBudgetRequest, tenant_id="acme", scope=TEAM, period=DAY),
        "scope_id",
    ),
    ("SetBudget", _admin(admin_pb2.SetBudgetRequest, scope=T, period=DAY), "tenant_id"),
    (
        "SetLimits",
        _admin(admin_pb2.SetLimitsRequest, tenant_id="acme", scope=T, requests_per_minute=-1),
        "requests_per_minute",
    ),
    (
        "SetLimits",
        _admin(admin_pb2.SetLimitsRequest, tenant_id="acme", scope=T, tokens_per_minute=-1),
        "tokens_per_minute",
    ),
    (
        "SetLimits",
        _admin(
            admin_pb2.SetLimitsRequest,
            tenant_id="acme",
            scope=KEY,
            scope_id="acme-main",
            max_concurrent=2,
        ),
        "max_concurrent",
    ),
    (
        "SetLimits",
        _admin(admin_pb2.SetLimitsRequest, tenant_id="acme", scope=TEAM, scope_id="search"),
        "scope",
    ),
    ("SetLimits", _admin(admin_pb2.SetLimitsRequest, tenant_id="acme"), "scope"),
    ("SetLimits", _admin(admin_pb2.SetLimitsRequest, scope=T, requests_per_minute=5), "tenant_id"),
    ("GetUsage", _admin(admin_pb2.GetUsageRequest, tenant_id="acme", scope=T), "period"),
    ("GetUsage", _admin(admin_pb2.GetUsageRequest, tenant_id="acme", period=DAY), "scope"),
    (
        "GetUsage",
        _admin(admin_pb2.GetUsageRequest, scope=MODEL, scope_id="mock-small", period=DAY),
        "tenant_id",
    ),
    (
        "GetUsage",
        _admin(admin_pb2.GetUsageRequest, tenant_id="acme", scope=KEY, period=DAY),
        "scope_id",
    ),
    ("ListBreakers", _admin(admin_pb2.ListBreakersRequest, page_size=-1), "page_size"),
    ("ListBreakers", _admin(admin_pb2.ListBreakersRequest, page_token="not-a-token"), "page_token"),
]


RPCS = sorted({rpc for rpc, _, _ in BAD_INPUT})


@pytest.mark.parametrize("rpc", RPCS)
async def test_bad_input_is_invalid_names_the_field_and_changes_nothing(
    admin_control: Served, test_keys: ApiKeys, redis_db: redis.Redis, rpc: str
) -> None:
    admin = admin_pb2_grpc.ControlAdminServiceStub(admin_control.channel)
    stub, metadata = (
        (admin_control.stub, None) if hasattr(admin_control.stub, rpc) else (admin, AUTH)
    )
    before = state_snapshot(redis_db)

    for name, build, field in BAD_INPUT:
        if name != rpc:
            continue
        request = build(test_keys.acme)
        error = await refusal(getattr(stub, rpc)(request, metadata=metadata))

        assert (error.code, error.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_INVALID",
        ), request
        assert error.field_violations == [field], request
        assert state_snapshot(redis_db) == before, request
