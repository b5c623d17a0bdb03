"""End to end: a client, the four service processes, Redis, and an OpenAI-compatible upstream."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from typing import Any

import grpc
import pytest
import redis

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.devstack import LocalStack
from tests.conftest import ApiKeys
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import (
    bearer,
    rich_error,
    state_snapshot,
    usage_record,
    user,
    wait_until_nothing_reserved,
)

Stub = orchestrator_pb2_grpc.OrchestratorServiceStub


def ask(text: str, model: str = "up-ok", **params: Any):
    return orchestrator_pb2.StreamGenerateRequest(
        model=model, messages=[user(text)], params=common_pb2.GenerationParams(**params)
    )


def run(public_api: Stub, key: str, request, timeout: float = 20):
    return list(public_api.StreamGenerate(request, metadata=bearer(key), timeout=timeout))


def refused(public_api: Stub, key: str, request):
    with pytest.raises(grpc.RpcError) as caught:
        run(public_api, key, request)
    return rich_error(caught.value)


def test_a_streamed_answer_arrives_whole_in_order_with_one_final_chunk(
    public_api: Stub, test_keys: ApiKeys, upstream: FakeOpenAI, redis_db: redis.Redis
) -> None:
    marker = uuid.uuid4().hex
    chunks = run(public_api, test_keys.acme, ask(f"whole stream {marker}"))
    [exchange] = [e for e in upstream.calls() if marker in str(e.body)]
    kinds = [c.WhichOneof("chunk") for c in chunks]
    # Chunks the upstream sent together may arrive as one delta; the text is the same.
    assert kinds[0] == "start" and kinds[-1] == "final"
    assert set(kinds[1:-1]) == {"delta"}
    assert "".join(c.delta.text for c in chunks[1:-1]) == "".join(exchange.sent)
    start, final = chunks[0].start, chunks[-1].final
    assert (start.model, start.cache_status) == ("up-ok", common_pb2.CACHE_STATUS_MISS)
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP
    assert exchange.usage is not None
    assert final.usage.input_tokens == exchange.usage["prompt_tokens"]
    assert final.usage.output_tokens == exchange.usage["completion_tokens"]
    # up-ok costs $2.50 in / $10 out per million tokens.
    assert final.cost.input_usd_micros == -(-exchange.usage["prompt_tokens"] * 5 // 2)
    assert final.cost.output_usd_micros == exchange.usage["completion_tokens"] * 10


def test_the_same_request_again_is_a_hit_and_the_upstream_saw_one_call(
    public_api: Stub, test_keys: ApiKeys, upstream: FakeOpenAI, redis_db: redis.Redis
) -> None:
    marker = uuid.uuid4().hex
    request = ask(f"twice {marker}", temperature=0)
    first = run(public_api, test_keys.acme, request)
    second = run(public_api, test_keys.acme, request)
    assert len([e for e in upstream.calls() if marker in str(e.body)]) == 1
    assert second[0].start.cache_status == common_pb2.CACHE_STATUS_HIT
    assert second[-1].final.cache_status == common_pb2.CACHE_STATUS_HIT

    def text(chunks):
        return "".join(c.delta.text for c in chunks if c.HasField("delta"))

    assert text(second) == text(first)


def test_usage_settled_in_redis_equals_what_the_upstream_reported(
    public_api: Stub, test_keys: ApiKeys, upstream: FakeOpenAI, redis_db: redis.Redis
) -> None:
    markers = [uuid.uuid4().hex for _ in range(3)]
    # Settlements land after the replies: earlier tests' first, then these three.
    wait_until_nothing_reserved(redis_db)
    before = usage_record(redis_db, key_id="acme-main")
    finals = [run(public_api, test_keys.acme, ask(f"usage {m}"))[-1].final for m in markers]
    reported = [e.usage for e in upstream.calls() if any(m in str(e.body) for m in markers)]
    assert len(reported) == 3 and all(reported)
    wait_until_nothing_reserved(redis_db)
    after = usage_record(redis_db, key_id="acme-main")

    def grew(field: str) -> int:
        return after.get(field, 0) - before.get(field, 0)

    assert grew("requests") == 3
    assert grew("input_tokens") == sum(u["prompt_tokens"] for u in reported if u)
    assert grew("output_tokens") == sum(u["completion_tokens"] for u in reported if u)
    assert grew("spent") == sum(f.cost.total_usd_micros for f in finals)


def test_a_wrong_key_is_unauthenticated(public_api: Stub) -> None:
    error = refused(public_api, "sk-strata-wrongwrongwrongwrongwrongwrongwrongwro", ask("hi"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")


def test_an_unknown_model_is_not_found(
    public_api: Stub, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    error = refused(public_api, test_keys.acme, ask("hi", model="gpt-17"))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")
    assert error.metadata["model"] == "gpt-17"


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (orchestrator_pb2.StreamGenerateRequest(model="up-ok"), "messages"),
        (ask("zero tokens", max_output_tokens=0), "params.max_output_tokens"),
        (ask("negative tokens", max_output_tokens=-5), "params.max_output_tokens"),
    ],
)
def test_invalid_input_is_refused_before_any_upstream_call(
    public_api: Stub,
    test_keys: ApiKeys,
    upstream: FakeOpenAI,
    redis_db: redis.Redis,
    request_,
    field: str,
) -> None:
    calls_before = len(upstream.calls())
    before = state_snapshot(redis_db)
    error = refused(public_api, test_keys.acme, request_)
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == [field]
    assert len(upstream.calls()) == calls_before
    assert state_snapshot(redis_db) == before


def test_the_per_key_limit_becomes_rate_limited_with_a_retry_delay(
    public_api: Stub, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    for i in range(3):
        run(public_api, test_keys.tight, ask(f"limit {i}", model="mock-fast"))
    error = refused(public_api, test_keys.tight, ask("one too many", model="mock-fast"))
    assert (error.code, error.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert error.retry_delay_s is not None and 0 < error.retry_delay_s <= 20


def test_a_provider_failure_reaches_the_client_with_its_reason(
    public_api: Stub, test_keys: ApiKeys
) -> None:
    error = refused(public_api, test_keys.acme, ask("fail please", model="up-500"))
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    assert "boom" not in error.message
    cut = refused(public_api, test_keys.acme, ask("cut please", model="up-cut"))
    assert (cut.code, cut.reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED")


def test_a_client_that_cancels_stops_the_upstream_call(
    public_api: Stub, test_keys: ApiKeys, upstream: FakeOpenAI, redis_db: redis.Redis
) -> None:
    marker = uuid.uuid4().hex
    cancelled_before = usage_record(redis_db).get("outcome_cancelled", 0)
    call = public_api.StreamGenerate(
        ask(f"cancel {marker}", model="up-slow"), metadata=bearer(test_keys.acme), timeout=60
    )
    deltas = 0
    for chunk in call:
        deltas += chunk.HasField("delta")
        if deltas == 3:
            break
    call.cancel()
    [exchange] = [e for e in upstream.calls() if marker in str(e.body)]
    assert exchange.disconnected.wait(10), "the upstream stream was not closed"
    assert len(exchange.sent) < 100
    deadline = time.monotonic() + 10
    while usage_record(redis_db).get("outcome_cancelled", 0) != cancelled_before + 1:
        assert time.monotonic() < deadline, "the cancelled request was not settled"
        time.sleep(0.02)


def test_the_chat_command_streams_an_answer(stack: LocalStack, test_keys: ApiKeys) -> None:
    command = [sys.executable, "-m", "strata_cli", "chat", "--address"]
    command += [stack.addresses["orchestrator"], "--model", "up-ok", "--key"]
    ok = subprocess.run(
        [*command, test_keys.acme, "hello from the cli"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("Upstream1 Upstream2")
    assert "cache MISS" in ok.stderr and "[stop ·" in ok.stderr
    bad = subprocess.run(
        [*command, "sk-strata-nope", "hello"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 1
    assert "UNAUTHENTICATED API_KEY_INVALID" in bad.stderr
