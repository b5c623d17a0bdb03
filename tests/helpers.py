"""Small helpers of the tests: Strata's rich errors, usage records, waiting for state."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2

from services.common.coalesce import Coalescer
from strata.common.v1 import common_pb2
from strata_cli.devstack import LocalStack


@dataclass
class RichError:
    """What a client can read from a Strata error."""

    code: grpc.StatusCode
    message: str
    reason: str = ""
    domain: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    retry_delay_s: float | None = None
    field_violations: list[str] = field(default_factory=list)


def rich_error(err: grpc.RpcError) -> RichError:
    """Decodes the code, ErrorInfo, RetryInfo and BadRequest of an RPC error."""
    assert isinstance(err, grpc.aio.AioRpcError | grpc.Call), err
    code = err.code()
    trailing = err.trailing_metadata() or ()
    result = RichError(code=code, message=err.details() or "")
    for key, value in trailing:
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        assert status.code == code.value[0]
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                result.reason, result.domain = info.reason, info.domain
                result.metadata = dict(info.metadata)
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                delay: duration_pb2.Duration = retry.retry_delay
                result.retry_delay_s = delay.ToNanoseconds() / 1e9
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                result.field_violations = [v.field for v in bad.field_violations]
    return result


def usage_record(
    client: redis.Redis, tenant: str = "acme", key_id: str | None = None
) -> dict[str, int]:
    """The all-time usage totals control recorded for a tenant (or one of its keys)."""
    holder = f"key:{key_id}" if key_id else "tenant"
    name = f"strata:{{t:{tenant}}}:usage:{holder}:total"
    raw: dict[bytes, bytes] = client.hgetall(name)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in raw.items()}


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def state_snapshot(client: redis.Redis) -> dict[bytes, object]:
    """Every key of the database with its value, to prove a call changed nothing.

    The cache's statistics are left out: they are flushed every second, whatever the call.
    """
    snapshot: dict[bytes, object] = {}
    for key in client.scan_iter("*"):
        if key.startswith(b"strata:cache:stats:"):
            continue
        kind = client.type(key)
        if kind == b"hash":
            snapshot[key] = client.hgetall(key)
        elif kind == b"string":
            snapshot[key] = client.get(key)
        elif kind == b"zset":
            snapshot[key] = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"set":
            snapshot[key] = client.smembers(key)
        else:
            snapshot[key] = kind
    return snapshot


def fresh_stack(
    run_dir: Path,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
    env: Mapping[str, str],
) -> LocalStack:
    """The services as processes on an emptied Redis (their settings overridden by `env`)."""
    redis.Redis.from_url(redis_url).flushdb()
    return LocalStack(
        run_dir=run_dir,
        models_file=models_file,
        tenants_file=tenants_file,
        redis_url=redis_url,
        env=env,
    ).start()


async def eventually(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """Polls `check` (sync or async) until it returns something truthy, within a bound.

    For what a request leaves behind after its reply (its settlement, its stored answer,
    its record, its breaker records): the reply does not wait for them."""
    async with asyncio.timeout(timeout_s):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await asyncio.sleep(0.02)


def wait_until(check: Callable[[], Any], timeout_s: float = 10.0) -> Any:
    """`eventually` for synchronous tests."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout_s}s: {check}")
        time.sleep(0.02)
    return result


def reserved(client: redis.Redis, tenant: str = "acme") -> int:
    """Reservations the tenant holds: one per admitted request not yet settled."""
    return int(client.hlen(f"strata:{{t:{tenant}}}:reservations"))


def wait_until_nothing_reserved(
    client: redis.Redis, timeout_s: float = 10.0, tenant: str = "acme"
) -> None:
    """Until every request the tenant was admitted for is settled (settlements land after
    the replies)."""
    wait_until(lambda: reserved(client, tenant) == 0, timeout_s)


@contextlib.contextmanager
def writes_paused(redis_db: redis.Redis) -> Iterator[None]:
    """Redis holds every write (scripts included) until the block ends; reads go on."""
    redis_db.execute_command("CLIENT", "PAUSE", 10_000, "WRITE")
    try:
        yield
    finally:
        redis_db.execute_command("CLIENT", "UNPAUSE")


async def held_decisions(redis_db: redis.Redis, count: int) -> None:
    """Waits until `count` connections have a script held by the pause."""
    async with asyncio.timeout(5):
        while True:
            clients = redis_db.client_list()
            held = [c for c in clients if "b" in c["flags"] and c["cmd"] == "evalsha"]
            if len(held) >= count:
                return
            await asyncio.sleep(0.01)


def handed_over(monkeypatch: pytest.MonkeyPatch, kind: type) -> list[Any]:
    """The requests of type `kind` handed to any `Coalescer` from now on (in order): a
    test waits for them to pile up before it lets the call on its way return."""
    handed: list[Any] = []
    submit = Coalescer.submit

    async def counted(self: Coalescer[Any, Any], item: Any, at_once: bool = False) -> Any:
        if isinstance(item[0], kind):
            handed.append(item[0])
        return await submit(self, item, at_once)

    monkeypatch.setattr(Coalescer, "submit", counted)
    return handed
