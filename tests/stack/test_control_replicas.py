"""Two control processes on one Redis: budgets, limits and breakers hold across replicas."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml

from services.control.keys import new_key
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2, control_pb2_grpc
from strata_cli.devstack import ServiceProcess
from tests.helpers import rich_error

BUDGET = 20_000
"""Micro-USD a day for the tenant; each request's worst case is 555, so ~36 fit at once."""
WORST = 100 * 150_000 // 1_000_000 + 900 * 600_000 // 1_000_000  # mock-fast: $0.15 / $0.60


@pytest.fixture(scope="module")
def replica_keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, str], Path]:
    made = {name: new_key() for name in ("ledger", "burst", "breaker")}
    tenants = {
        "tenants": {
            "ledger": {
                "budgets": {"day_usd": str(BUDGET / 1_000_000)},
                "keys": [{"id": "ledger-key", "sha256": made["ledger"][1]}],
            },
            "burst": {
                "limits": {"requests_per_minute": 600, "burst_s": 1},
                "keys": [{"id": "burst-key", "sha256": made["burst"][1]}],
            },
            "breaker": {"keys": [{"id": "breaker-key", "sha256": made["breaker"][1]}]},
        }
    }
    path = tmp_path_factory.mktemp("replicas") / "tenants.yaml"
    path.write_text(yaml.safe_dump(tenants))
    return {name: key for name, (key, _) in made.items()}, path


@pytest.fixture(scope="module")
def replica_models(tmp_path_factory: pytest.TempPathFactory, models_file: Path) -> Path:
    catalog = yaml.safe_load(models_file.read_text())
    catalog["models"]["fragile"] = {
        "provider": "mock",
        "upstream_model": "echo",
        "fallbacks": ["mock-fast"],
        "breaker": {"consecutive_failures": 3, "cooldown_s": 1, "probe_timeout_s": 5},
    }
    path = tmp_path_factory.mktemp("replicas") / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


@pytest.fixture(scope="module")
def replicas(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    replica_keys: tuple[dict[str, str], Path],
    replica_models: Path,
) -> Iterator[list[control_pb2_grpc.ControlServiceStub]]:
    run_dir = tmp_path_factory.mktemp("replicas-run")
    redis.Redis.from_url(redis_url).flushdb()
    settings = {
        "REDIS_URL": redis_url,
        "TENANTS_FILE": str(replica_keys[1]),
        "MODELS_FILE": str(replica_models),
        "SWEEP_INTERVAL_S": "0.2",
    }
    processes = [
        ServiceProcess("control", run_dir, settings, name=f"control-{i}").start() for i in (1, 2)
    ]
    channels = [grpc.insecure_channel(p.address) for p in processes]
    try:
        yield [control_pb2_grpc.ControlServiceStub(c) for c in channels]
    finally:
        for channel in channels:
            channel.close()
        for process in processes:
            process.stop()


def admit(stub: Any, key: str, request_id: str, model: str = "mock-fast", **kw: Any) -> Any:
    return stub.Admit(
        control_pb2.AdmitRequest(
            request_id=request_id,
            api_key=key,
            model=model,
            estimated_input_tokens=kw.pop("tokens_in", 100),
            max_output_tokens=kw.pop("tokens_out", 900),
            **kw,
        ),
        timeout=10,
    )


def settle(stub: Any, admitted: Any, request_id: str, cost: int, **kw: Any) -> Any:
    return stub.Settle(
        control_pb2.SettleRequest(
            request_id=request_id,
            tenant_id=admitted.tenant_id,
            key_id=admitted.key_id,
            team_id=admitted.team_id,
            outcome=control_pb2.OUTCOME_SUCCESS,
            model=kw.pop("model", "mock-fast"),
            usage=common_pb2.Usage(input_tokens=50, output_tokens=cost),
            cost=common_pb2.Cost(total_usd_micros=cost),
            cache_status=common_pb2.CACHE_STATUS_MISS,
            **kw,
        ),
        timeout=10,
    )


def ledger(client: redis.Redis, tenant: str) -> tuple[int, int]:
    """(spent today, reserved now) of a tenant."""
    day = int(time.time() // 86400)
    spent = client.hget(f"strata:{{t:{tenant}}}:usage:tenant:d{day}", "spent")
    reserved = client.hget(f"strata:{{t:{tenant}}}:reserved", "tenant")
    return int(spent or 0), int(reserved or 0)


def test_a_budget_holds_under_200_concurrent_admits_on_two_replicas(
    replicas: list[Any], replica_keys: tuple[dict[str, str], Path], redis_url: str
) -> None:
    key = replica_keys[0]["ledger"]
    client = redis.Redis.from_url(redis_url)
    settled: dict[str, tuple[Any, int]] = {}
    refused: list[str] = []
    lock = threading.Lock()
    worst_seen = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            spent, reserved = ledger(client, "ledger")
            worst_seen[0] = max(worst_seen[0], spent + reserved)
            time.sleep(0.002)

    def one(i: int) -> None:
        request_id = f"budget-{i}-{uuid.uuid4().hex[:8]}"
        stub = replicas[i % 2]
        try:
            admitted = admit(stub, key, request_id)
        except grpc.RpcError as err:
            with lock:
                refused.append(rich_error(err).reason)
            return
        assert admitted.reserved_usd_micros == WORST
        time.sleep(random.uniform(0, 0.02))
        cost = random.randint(1, WORST)
        assert settle(replicas[(i + 1) % 2], admitted, request_id, cost).applied
        with lock:
            settled[request_id] = (admitted, cost)

    watcher = threading.Thread(target=watch)
    watcher.start()
    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(one, range(200)))
    stop.set()
    watcher.join()

    assert 200 * WORST > 5 * BUDGET  # the worst cases exceed the budget several times
    assert set(refused) <= {"BUDGET_EXCEEDED"}
    assert refused, "the budget never refused anything: the test proves nothing"
    spent, reserved = ledger(client, "ledger")
    assert reserved == 0
    assert spent == sum(cost for _, cost in settled.values())
    assert spent <= BUDGET
    assert worst_seen[0] <= BUDGET  # spend + reservations never passed the budget

    # Replayed settlements change nothing, on either replica.
    for i, (request_id, (admitted, cost)) in enumerate(settled.items()):
        assert not settle(replicas[i % 2], admitted, request_id, cost).applied
    assert ledger(client, "ledger") == (spent, 0)


def test_a_rate_limit_never_admits_more_than_limit_plus_burst(
    replicas: list[Any], replica_keys: tuple[dict[str, str], Path]
) -> None:
    key = replica_keys[0]["burst"]
    # When each admission was decided is only known to lie between its send and its reply.
    admitted: list[tuple[float, float]] = []
    lock = threading.Lock()
    rng = random.Random(7)
    delays = [rng.uniform(0, 4.0) for _ in range(240)]

    def one(i: int) -> None:
        time.sleep(delays[i])
        sent = time.monotonic()
        try:
            admit(replicas[i % 2], key, f"burst-{i}-{uuid.uuid4().hex[:6]}", tokens_out=10)
        except grpc.RpcError as err:
            assert rich_error(err).reason == "RATE_LIMITED"
            return
        answered = time.monotonic()
        with lock:
            admitted.append((sent, answered))

    with ThreadPoolExecutor(max_workers=64) as pool:
        list(pool.map(one, range(240)))
    rate, burst = 10.0, 10  # 600 per minute, 1 s of burst
    assert len(admitted) < 240, "the limit never refused anything: the test proves nothing"
    assert len(admitted) >= burst + rate * 3, "the limit refused more than it had to"
    for start, _ in admitted:
        for window in (0.5, 1.0, 2.0):
            # Admissions sent and answered within the window were surely decided in it (a
            # reply held up in this process cannot crowd the count).
            inside = sum(1 for s, a in admitted if s >= start and a <= start + window)
            # the +1 absorbs the clock difference between Redis and this process
            assert inside <= burst + rate * window + 1, (start, window, inside)


def test_a_failing_model_opens_on_every_replica_and_a_probe_closes_it(
    replicas: list[Any], replica_keys: tuple[dict[str, str], Path]
) -> None:
    key = replica_keys[0]["breaker"]

    def admit_and_fail(stub: Any) -> None:
        request_id = uuid.uuid4().hex
        reply = admit(stub, key, request_id, model="fragile", tokens_out=10)
        failed = control_pb2.Attempt(
            model="fragile", success=False, error_reason="PROVIDER_UNAVAILABLE"
        )
        settle(stub, reply, request_id, 1, attempts=[failed], model="")

    assert [m for m, _ in _plan(replicas[0], key)] == ["fragile", "mock-fast"]
    for i in range(3):
        admit_and_fail(replicas[i % 2])
    for stub in replicas:  # open: every replica skips it
        assert [m for m, _ in _plan(stub, key)] == ["mock-fast"]
    time.sleep(1.2)  # the cool-down
    request_id = uuid.uuid4().hex
    probe = admit(replicas[0], key, request_id, model="fragile", tokens_out=10)
    assert [(c.model, c.probe) for c in probe.plan] == [("fragile", True), ("mock-fast", False)]
    # While the probe runs, the other replica does not send a second one.
    assert [m for m, _ in _plan(replicas[1], key)] == ["mock-fast"]
    ok = control_pb2.Attempt(model="fragile", success=True)
    settle(replicas[0], probe, request_id, 1, attempts=[ok], model="fragile")
    for stub in replicas:
        assert [m for m, _ in _plan(stub, key)] == ["fragile", "mock-fast"]


def _plan(stub: Any, key: str) -> list[tuple[str, bool]]:
    request_id = uuid.uuid4().hex
    reply = admit(stub, key, request_id, model="fragile", tokens_out=10)
    settle(stub, reply, request_id, 1, model="")
    return [(c.model, c.probe) for c in reply.plan]
