"""Secrets never leak: plant them, run traffic (errors included), grep everything the stack wrote.

Planted: the provider's API key (read by the executor from an environment variable named by
`api_key_env`), every tenant's clear API key, a key created through the admin API, a wrong
key a client sent, the control and cache admin tokens. After generate (unary, streamed,
replayed by request id), upstream failures, a bad key, a trace record (content capture off),
a job and key administration, none of them appears in any log file, any Redis key or value,
any OTLP span or metric export, or any error a client received. Hashes are fine.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml

from strata.control.v1 import admin_pb2, admin_pb2_grpc
from strata.orchestrator.v1 import (
    jobs_pb2,
    jobs_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    traces_pb2,
    traces_pb2_grpc,
)
from strata_cli.devstack import SERVICES, LocalStack
from tests.conftest import ApiKeys
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import bearer, user
from tests.otlp_receiver import OtlpReceiver

PROVIDER_SECRET = f"sk-PLANTED-provider-{uuid.uuid4().hex}"
ADMIN_SECRET = f"PLANTED-admin-{uuid.uuid4().hex}"
WRONG_KEY = f"sk-strata-PLANTED-wrong-{uuid.uuid4().hex}"
KEY_ENV = "STRATA_TEST_PLANTED_PROVIDER_KEY"


@pytest.fixture
def secret_models_file(models_file: Path, tmp_path: Path) -> Path:
    """The test catalog, its fake upstream now needing the planted provider key."""
    catalog = yaml.safe_load(models_file.read_text())
    catalog["providers"]["fake"]["api_key_env"] = KEY_ENV
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


class Seen:
    """Everything a client received that could carry a secret."""

    def __init__(self) -> None:
        self.blobs: list[bytes] = []

    def error(self, call: Callable[[], Any]) -> grpc.StatusCode:
        """Runs the call; keeps its reply, or its error's message and trailers."""
        try:
            self.reply(call())
        except grpc.RpcError as err:
            self.blobs.append((err.details() or "").encode())
            for key, value in err.trailing_metadata() or ():
                raw = value if isinstance(value, bytes) else value.encode()
                self.blobs.append(key.encode() + b"=" + raw)
            return err.code()
        return grpc.StatusCode.OK

    def reply(self, message: object) -> None:
        self.blobs.append(message.SerializeToString())  # type: ignore[attr-defined]


def redis_dump(client: redis.Redis) -> list[bytes]:
    """Every key of the database, its value read by type, and its DUMP."""
    out: list[bytes] = []
    db: Any = client  # redis-py's sync and async return types are one union
    for key in db.scan_iter(count=1000):
        out.append(key)
        kind = db.type(key).decode()
        if kind == "string":
            out.append(db.get(key) or b"")
        elif kind == "hash":
            for field, value in db.hgetall(key).items():
                out += [field, value]
        elif kind == "list":
            out += db.lrange(key, 0, -1)
        elif kind == "set":
            out += list(db.smembers(key))
        elif kind == "zset":
            out += [member for member, _ in db.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for entry_id, fields in db.xrange(key):
                out.append(entry_id)
                for field, value in fields.items():
                    out += [field, value]
        out.append(db.dump(key) or b"")
    return out


def test_planted_secrets_appear_nowhere_the_stack_wrote(
    tmp_path: Path,
    redis_url: str,
    tenants_file: Path,
    secret_models_file: Path,
    test_keys: ApiKeys,
    upstream: FakeOpenAI,
    receiver: OtlpReceiver,
) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    telemetry = {
        f"STRATA_{service.upper()}_{name}": value
        for service in SERVICES
        for name, value in (("OTLP_ENDPOINT", receiver.endpoint), ("METRIC_EXPORT_INTERVAL_S", "1"))
    }
    stack = LocalStack(
        run_dir=tmp_path / "run",
        models_file=secret_models_file,
        tenants_file=tenants_file,
        redis_url=redis_url,
        env={
            KEY_ENV: PROVIDER_SECRET,
            "STRATA_CONTROL_ADMIN_TOKEN": ADMIN_SECRET,
            "STRATA_ORCHESTRATOR_KNOWLEDGE_ENABLED": "0",
            "STRATA_ORCHESTRATOR_LOG_LEVEL": "DEBUG",
            "STRATA_EXECUTOR_LOG_LEVEL": "DEBUG",
            **telemetry,
        },
    ).start()
    seen = Seen()
    created_key = ""
    try:
        cache_token = stack.services["cache"].settings["ADMIN_TOKEN"]
        public = grpc.insecure_channel(stack.addresses["orchestrator"])
        admin_channel = grpc.insecure_channel(stack.addresses["control"])
        api = orchestrator_pb2_grpc.OrchestratorServiceStub(public)
        jobs = jobs_pb2_grpc.JobServiceStub(public)
        traces = traces_pb2_grpc.TraceServiceStub(public)
        admin = admin_pb2_grpc.ControlAdminServiceStub(admin_channel)
        key = bearer(test_keys.acme)
        marker = f"leaktest{uuid.uuid4().int % 10**6}"  # no high-entropy text: guardrails

        # Answers: unary with a request id, its replay, streamed.
        request = orchestrator_pb2.GenerateRequest(
            model="up-ok", messages=[user(f"secrets {marker}")], request_id=uuid.uuid4().hex
        )
        first = api.Generate(request, metadata=key, timeout=30)
        seen.reply(first)
        seen.reply(api.Generate(request, metadata=key, timeout=30))
        for chunk in api.StreamGenerate(
            orchestrator_pb2.StreamGenerateRequest(
                model="up-ok", messages=[user(f"streamed {marker}")]
            ),
            metadata=key,
            timeout=30,
        ):
            seen.reply(chunk)
        # The planted provider key really was in use.
        assert any(
            PROVIDER_SECRET in value
            for call in upstream.calls(marker)
            for value in call.headers.values()
        )

        # Errors: upstream failures, a wrong key, a disabled key, no key.
        for model in ("up-500", "up-quota", "up-malformed"):
            failing = orchestrator_pb2.GenerateRequest(
                model=model, messages=[user(f"{model} {marker}")]
            )
            seen.error(functools.partial(api.Generate, failing, metadata=key, timeout=30))
        assert (
            seen.error(lambda: api.Generate(request, metadata=bearer(WRONG_KEY), timeout=10))
            == grpc.StatusCode.UNAUTHENTICATED
        )
        seen.error(lambda: api.Generate(request, metadata=bearer(test_keys.disabled), timeout=10))
        seen.error(lambda: api.Generate(request, timeout=10))
        seen.error(
            lambda: admin.GetUsage(
                admin_pb2.GetUsageRequest(tenant_id="acme"), metadata=bearer(WRONG_KEY)
            )
        )

        # The request's record (content capture is off by default).
        seen.reply(
            traces.GetTrace(traces_pb2.GetTraceRequest(request_id=first.request_id), metadata=key)
        )

        # A job.
        job = jobs.SubmitJob(
            jobs_pb2.SubmitJobRequest(
                request_id=uuid.uuid4().hex,
                generate=orchestrator_pb2.GenerateRequest(
                    model="up-ok", messages=[user(f"job {marker}")]
                ),
            ),
            metadata=key,
        ).job
        deadline = time.monotonic() + 30
        while job.state not in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED):
            assert time.monotonic() < deadline
            time.sleep(0.1)
            job = jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), metadata=key).job
        assert job.state == jobs_pb2.JOB_STATE_SUCCEEDED
        seen.reply(job)

        # Key administration: create, use, revoke, list, usage.
        auth = bearer(ADMIN_SECRET)
        created = admin.CreateApiKey(
            admin_pb2.CreateApiKeyRequest(
                request_id=uuid.uuid4().hex, tenant_id="acme", key_id="planted"
            ),
            metadata=auth,
        )
        created_key = created.api_key
        seen.reply(created.key)
        seen.reply(
            api.Generate(
                orchestrator_pb2.GenerateRequest(model="mock-fast", messages=[user("new key")]),
                metadata=bearer(created_key),
                timeout=30,
            )
        )
        admin.RevokeApiKey(
            admin_pb2.RevokeApiKeyRequest(
                request_id=uuid.uuid4().hex, tenant_id="acme", key_id="planted"
            ),
            metadata=auth,
        )
        seen.reply(admin.ListApiKeys(admin_pb2.ListApiKeysRequest(tenant_id="acme"), metadata=auth))
        usage = admin_pb2.GetUsageRequest(
            tenant_id="acme", scope=admin_pb2.SCOPE_TENANT, period=admin_pb2.PERIOD_TOTAL
        )
        seen.reply(admin.GetUsage(usage, metadata=auth))
        public.close()
        admin_channel.close()
    finally:
        stack.stop()  # drains: telemetry and logs are flushed
    receiver.wait_for(lambda r: bool(r.trace_requests), message="spans")

    secrets = {
        "provider key": PROVIDER_SECRET,
        "control admin token": ADMIN_SECRET,
        "cache admin token": cache_token,
        "wrong key": WRONG_KEY,
        "created key": created_key,
        **{f"key {name}": value for name, value in vars(test_keys).items()},
    }
    assert all(secrets.values())
    written: dict[str, bytes] = {}
    for path in sorted((tmp_path / "run").rglob("*")):
        if path.is_file():
            written[f"file {path.relative_to(tmp_path)}"] = path.read_bytes()
    assert any(name.startswith("file run/logs/") for name in written)
    written["redis"] = b"\n".join(redis_dump(client))
    assert marker.encode() in written["redis"]  # the dump reads values (stored answers)
    assert receiver.trace_requests, "no spans reached the receiver"
    written["otlp spans"] = b"\n".join(r.SerializeToString() for r in receiver.trace_requests)
    written["otlp metrics"] = b"\n".join(r.SerializeToString() for r in receiver.metric_requests)
    written["client replies and errors"] = b"\n".join(seen.blobs)
    leaks = [
        f"{secret} in {where}"
        for where, blob in written.items()
        for secret, value in secrets.items()
        if value.encode() in blob
    ]
    assert not leaks, leaks
