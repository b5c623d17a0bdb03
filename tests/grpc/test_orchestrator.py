"""The public API through real stubs, with control, cache and executor served in-process."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis

from services.cache.answers import AnswerCache
from services.common.chat import assemble_tool_calls
from services.common.errors import DeadlineExceeded
from services.executor import tokens
from services.orchestrator import clients, generation
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2
from strata.control.v1 import admin_pb2, admin_pb2_grpc
from strata.orchestrator.v1 import orchestrator_pb2
from strata_cli.devstack import free_port
from tests.conftest import ApiKeys
from tests.grpc.conftest import ADMIN_TOKEN, Served, StartControl, StartOrchestrator
from tests.helpers import (
    bearer,
    eventually,
    handed_over,
    reserved,
    rich_error,
    state_snapshot,
    usage_record,
    user,
)

MISS, HIT = common_pb2.CACHE_STATUS_MISS, common_pb2.CACHE_STATUS_HIT


def ask(text: str | None = None, model: str = "mock-fast", **kw: Any):
    params = kw.pop("params", {})
    assert isinstance(params, dict)
    return orchestrator_pb2.StreamGenerateRequest(
        model=model,
        messages=[user(text or f"question {uuid.uuid4().hex}")],
        params=common_pb2.GenerationParams(**params),
        **kw,
    )


async def stream(orchestrator: Served, key: str, request, timeout: float = 10):
    return [
        c
        async for c in orchestrator.stub.StreamGenerate(
            request, metadata=bearer(key), timeout=timeout
        )
    ]


def text_of(chunks) -> str:
    return "".join(c.delta.text for c in chunks if c.HasField("delta"))


async def failure(orchestrator: Served, key: str, request, timeout: float = 10):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stream(orchestrator, key, request, timeout)
    return rich_error(caught.value)


async def test_streams_start_deltas_final_then_hits_the_cache(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    request = ask(request_id="client-chosen-1")
    first = await stream(orchestrator, test_keys.acme, request)
    kinds = [c.WhichOneof("chunk") for c in first]
    assert kinds[0] == "start" and kinds[-1] == "final" and set(kinds[1:-1]) == {"delta"}
    start, final = first[0].start, first[-1].final
    assert (start.request_id, start.model, start.cache_status) == (
        "client-chosen-1",
        "mock-fast",
        MISS,
    )
    assert final.cache_status == MISS and final.cost.total_usd_micros > 0

    request.request_id = ""
    second = await stream(orchestrator, test_keys.acme, request)
    assert second[0].start.cache_status == HIT and second[-1].final.cache_status == HIT
    assert text_of(second) == text_of(first)
    assert second[-1].final.usage == final.usage
    assert second[-1].final.cost.total_usd_micros == 0
    assert second[0].start.request_id not in ("", "client-chosen-1")

    await eventually(lambda: reserved(redis_db) == 0)  # settled after the replies
    usage = usage_record(redis_db)
    assert (usage["requests"], usage["cache_hits"]) == (2, 1)
    assert usage["output_tokens"] == final.usage.output_tokens
    assert usage["spent"] == final.cost.total_usd_micros


async def test_unary_generate_matches_the_stream(orchestrator: Served, test_keys: ApiKeys) -> None:
    request = ask(params={"seed": 11})
    chunks = await stream(orchestrator, test_keys.acme, request)
    reply = await orchestrator.stub.Generate(
        orchestrator_pb2.GenerateRequest(
            model=request.model, messages=request.messages, params=request.params
        ),
        metadata=bearer(test_keys.acme),
    )
    assert reply.text == text_of(chunks)
    assert reply.cache_status == HIT
    fresh = await orchestrator.stub.Generate(
        orchestrator_pb2.GenerateRequest(model="mock-fast", messages=[user("unary only")]),
        metadata=bearer(test_keys.acme),
    )
    assert fresh.cache_status == MISS and fresh.text.startswith("Mock answer")
    assert fresh.usage.output_tokens > 0 and fresh.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_the_cache_is_shared_by_a_tenant_and_never_crosses_tenants(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    request = ask()
    await stream(orchestrator, test_keys.acme, request)
    same_tenant = await stream(orchestrator, test_keys.acme_second, request)
    other_tenant = await stream(orchestrator, test_keys.globex, request)
    assert same_tenant[0].start.cache_status == HIT
    assert other_tenant[0].start.cache_status == MISS


async def test_answers_stored_together_are_each_served_from_the_cache(
    orchestrator: Served, test_keys: ApiKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache holds the first store it gets: the answers after it pile up and go as one
    # StoreBatch.
    gate, held, batches = asyncio.Event(), asyncio.Event(), []
    store, store_batch = AnswerCache.store, AnswerCache.store_batch

    async def first_held(self: AnswerCache, request: Any) -> str:
        if not held.is_set():
            held.set()
            await gate.wait()
        return await store(self, request)

    async def seen(self: AnswerCache, requests: Any) -> list[str]:
        batches.append(len(requests))
        return await store_batch(self, requests)

    monkeypatch.setattr(AnswerCache, "store", first_held)
    monkeypatch.setattr(AnswerCache, "store_batch", seen)
    handed = handed_over(monkeypatch, cache_pb2.StoreRequest)
    requests = [ask() for _ in range(4)]
    for request in requests:
        await stream(orchestrator, test_keys.acme, request)
        await asyncio.wait_for(held.wait(), 5)
    await eventually(lambda: len(handed) == 4)
    gate.set()
    await eventually(lambda: batches == [3])
    for request in requests:
        again = await stream(orchestrator, test_keys.acme, request)
        assert again[0].start.cache_status == HIT
        assert text_of(again)


async def test_cache_policy_modes(orchestrator: Served, test_keys: ApiKeys) -> None:
    def with_mode(request, mode):
        copy = orchestrator_pb2.StreamGenerateRequest()
        copy.CopyFrom(request)
        copy.cache_policy.mode = mode
        return copy

    request = ask()
    bypass = await stream(
        orchestrator, test_keys.acme, with_mode(request, common_pb2.CACHE_MODE_BYPASS)
    )
    assert bypass[0].start.cache_status == common_pb2.CACHE_STATUS_BYPASS
    read_only = await stream(
        orchestrator, test_keys.acme, with_mode(request, common_pb2.CACHE_MODE_READ_ONLY)
    )
    assert read_only[0].start.cache_status == MISS  # nothing was stored by either
    write_only = await stream(
        orchestrator, test_keys.acme, with_mode(request, common_pb2.CACHE_MODE_WRITE_ONLY)
    )
    assert write_only[0].start.cache_status == common_pb2.CACHE_STATUS_BYPASS
    again = await stream(orchestrator, test_keys.acme, request)
    assert again[0].start.cache_status == HIT


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [((), "API_KEY_INVALID"), ((("authorization", "Basic abc"),), "API_KEY_INVALID")],
)
async def test_missing_bearer_key_is_unauthenticated(
    orchestrator: Served, metadata, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await orchestrator.stub.Generate(
            orchestrator_pb2.GenerateRequest(model="mock-fast", messages=[user("hi")]),
            metadata=metadata,
        )
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAUTHENTICATED, reason)


async def test_control_reasons_reach_the_client_unchanged(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    wrong = await failure(orchestrator, "sk-strata-" + "A" * 43, ask())
    assert (wrong.code, wrong.reason) == (grpc.StatusCode.UNAUTHENTICATED, "API_KEY_INVALID")
    for _ in range(3):
        await stream(orchestrator, test_keys.tight, ask())
    limited = await failure(orchestrator, test_keys.tight, ask())
    assert (limited.code, limited.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert limited.retry_delay_s is not None and limited.retry_delay_s > 0
    assert limited.metadata["limit"] == "requests_per_minute"


async def test_executor_reasons_reach_the_client_unchanged(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    limited = await failure(
        orchestrator, test_keys.acme, ask(model="mock-rate-limited"), timeout=1.5
    )
    assert (limited.reason, limited.retry_delay_s) == ("UPSTREAM_RATE_LIMITED", 2)
    down = await failure(orchestrator, test_keys.acme, ask(model="mock-error"))
    assert (down.code, down.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")
    await _settled(redis_db, "outcome_failure", 2)


async def test_a_cut_stream_ends_in_an_error_after_its_deltas(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    chunks = []
    request = ask(model="mock-cut")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in orchestrator.stub.StreamGenerate(
            request, metadata=bearer(test_keys.acme), timeout=10
        ):
            chunks.append(chunk)
    kinds = [c.WhichOneof("chunk") for c in chunks]
    assert kinds[0] == "start" and "delta" in kinds and "final" not in kinds
    assert rich_error(caught.value).reason == "STREAM_INTERRUPTED"
    await _settled(redis_db, "outcome_failure", 1)
    # The partial output is charged as the executor counted it with the tokenizer.
    expected = tokens.estimate_usage(request.messages, text_of(chunks))
    usage = usage_record(redis_db)
    assert (usage["input_tokens"], usage["output_tokens"]) == (
        expected.input_tokens,
        expected.output_tokens,
    )


async def test_tool_calls_stream_through_and_come_back_from_the_cache(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    params = common_pb2.GenerationParams(
        tools=[common_pb2.Tool(name="lookup_order", parameters_json='{"type": "object"}')],
        tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED),
    )
    request = orchestrator_pb2.StreamGenerateRequest(
        model="mock-fast", messages=[user(f"where is order {uuid.uuid4().hex}")], params=params
    )
    for expected_status in (MISS, HIT):
        chunks = await stream(orchestrator, test_keys.acme, request)
        pieces = [p for c in chunks if c.HasField("delta") for p in c.delta.tool_calls]
        [call] = assemble_tool_calls(pieces)
        assert call.name == "lookup_order"
        assert call.id.startswith("call_")
        assert json.loads(call.arguments_json)["query"].startswith("where is order")
        final = chunks[-1].final
        assert final.finish_reason == common_pb2.FINISH_REASON_TOOL_CALLS
        assert final.cache_status == expected_status
    unary = await orchestrator.stub.Generate(
        orchestrator_pb2.GenerateRequest(
            model=request.model, messages=request.messages, params=params
        ),
        metadata=bearer(test_keys.acme),
    )
    assert [c.name for c in unary.tool_calls] == ["lookup_order"]
    assert unary.tool_calls[0] == call


async def test_a_transient_provider_failure_is_retried_unseen(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    chunks = await stream(orchestrator, test_keys.acme, ask(model="mock-fail-once"))
    assert chunks[-1].final.finish_reason == common_pb2.FINISH_REASON_STOP
    reply = await orchestrator.stub.Generate(
        orchestrator_pb2.GenerateRequest(model="mock-fail-once", messages=[user("unary retry")]),
        metadata=bearer(test_keys.acme),
    )
    assert reply.text.startswith("Mock answer")


@pytest.mark.parametrize(
    ("request_", "code", "reason", "fields"),
    [
        (ask(model="no-such-model"), grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND", []),
        (
            orchestrator_pb2.StreamGenerateRequest(model="mock-fast"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_INVALID",
            ["messages"],
        ),
        (
            ask(params={"max_output_tokens": 0}),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_INVALID",
            ["params.max_output_tokens"],
        ),
        (
            ask(request_id="not a valid id"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "REQUEST_INVALID",
            ["request_id"],
        ),
        (
            ask("word " * 20_000),
            grpc.StatusCode.INVALID_ARGUMENT,
            "PROMPT_TOO_LARGE",
            ["messages"],
        ),
    ],
    ids=["unknown-model", "no-messages", "zero-max-tokens", "bad-request-id", "too-large"],
)
async def test_bad_input_is_refused_before_any_state_changes(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    request_,
    code: grpc.StatusCode,
    reason: str,
    fields: list[str],
) -> None:
    before = state_snapshot(redis_db)
    error = await failure(orchestrator, test_keys.acme, request_)
    assert (error.code, error.reason) == (code, reason)
    assert error.field_violations == fields
    assert state_snapshot(redis_db) == before


async def test_deadline_passes_through_to_a_hanging_model(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    # Warm (channels open, the key known), so that the deadline passes at the model.
    await stream(orchestrator, test_keys.acme, ask())
    error = await failure(orchestrator, test_keys.acme, ask(model="mock-hang"), timeout=0.5)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    await _settled(redis_db, "outcome_cancelled", 1)


async def test_a_deadline_the_executor_reports_first_is_settled_as_cancelled(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The caller's deadline passes at the model: the executor's DEADLINE_EXCEEDED may reach
    the orchestrator before its own call is cancelled. Either way the request is settled as
    cancelled (it was counted a failure when the executor's reply came first)."""

    async def deadline_first(self: Any, request: Any, deadline: Any) -> Any:
        raise DeadlineExceeded("deadline exceeded waiting for executor")
        yield  # (an async generator, as ExecutorClient.stream)

    monkeypatch.setattr(clients.ExecutorClient, "stream", deadline_first)
    error = await failure(orchestrator, test_keys.acme, ask())
    assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
    await _settled(redis_db, "outcome_cancelled", 1)
    assert usage_record(redis_db).get("outcome_failure", 0) == 0


@pytest.mark.parametrize("then", ["runs", "stops"])
async def test_a_settlement_control_cannot_take_is_sent_once_it_is_back(
    start_control: StartControl,
    start_orchestrator: StartOrchestrator,
    tenants_file: Path,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    then: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Control goes away while a request runs (a restart): its settlement is kept and sent
    when control is back, by the orchestrator running on or on its way out, instead of its
    reservation expiring into a worst-case charge."""
    if then == "stops":
        monkeypatch.setattr(clients, "RESEND_S", (60.0, 60.0))  # only the last try sends
    port = free_port()
    first = await start_control(tenants_file, port=port)
    orchestrator = await start_orchestrator(
        control_address=f"127.0.0.1:{port}", knowledge_enabled=False
    )
    running = asyncio.create_task(
        stream(orchestrator, test_keys.acme, ask(model="up-slow-start"))  # 2 s to answer
    )
    await eventually(lambda: reserved(redis_db) == 1)
    await first.server.stop(0)
    chunks = await running
    assert chunks[-1].final.finish_reason == common_pb2.FINISH_REASON_STOP
    await asyncio.sleep(0.3)  # its settlement found no control
    assert reserved(redis_db) == 1
    await start_control(tenants_file, port=port)
    if then == "stops":
        await orchestrator.server.stop(5)
        assert reserved(redis_db) == 0
    else:
        await eventually(lambda: reserved(redis_db) == 0, timeout_s=20)
    usage = usage_record(redis_db)
    assert (usage["requests"], usage["outcome_success"]) == (1, 1)


async def test_a_failing_cache_is_a_miss_not_an_error(
    orchestrator: Served, cache: Served, test_keys: ApiKeys
) -> None:
    await cache.server.stop(0)
    chunks = await stream(orchestrator, test_keys.acme, ask())
    assert chunks[0].start.cache_status == common_pb2.CACHE_STATUS_ERROR
    assert chunks[-1].final.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_control_down_is_unavailable_with_a_reason(
    orchestrator: Served, control: Served, test_keys: ApiKeys
) -> None:
    await control.server.stop(0)
    error = await failure(orchestrator, test_keys.acme, ask())
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "CONTROL_UNAVAILABLE")


async def _settled(redis_db: redis.Redis, field: str, count: int) -> None:
    """Waits (bounded) for background settlements to land in Redis."""
    async with asyncio.timeout(5):
        while usage_record(redis_db).get(field, 0) < count:
            await asyncio.sleep(0.01)
    assert usage_record(redis_db)[field] == count


async def test_a_failing_model_falls_back_to_the_next_candidate(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    chunks = await stream(orchestrator, test_keys.acme, ask(model="mock-down"))
    assert chunks[0].start.model == "mock-fast"
    assert chunks[-1].final.finish_reason == common_pb2.FINISH_REASON_STOP
    # The failed attempt reached the breaker of mock-down, the answer was settled as mock-fast
    # (after the reply).
    await eventually(lambda: redis_db.hget("strata:{m:mock-down}:breaker", "consecutive"))
    assert redis_db.hget("strata:{m:mock-down}:breaker", "consecutive") == b"1"
    assert usage_record(redis_db)["model:mock-fast:requests"] == 1
    reply = await orchestrator.stub.Generate(
        orchestrator_pb2.GenerateRequest(model="mock-down", messages=[user("unary fallback")]),
        metadata=bearer(test_keys.acme),
    )
    assert reply.model == "mock-fast"


SECRET = "AKIAIOSFODNN7EXAMPLE"


async def test_a_secret_in_a_streamed_answer_cuts_the_stream(
    orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    # The mock repeats the question's first words, so the answer carries the key.
    request = ask(f"repeat {SECRET} please")
    chunks = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in orchestrator.stub.StreamGenerate(
            request, metadata=bearer(test_keys.watched), timeout=10
        ):
            chunks.append(chunk)
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (grpc.StatusCode.PERMISSION_DENIED, "GUARDRAIL_BLOCKED")
    assert error.metadata == {"rule": "secret.aws_access_key", "phase": "output"}
    assert chunks[0].HasField("start")
    assert SECRET not in text_of(chunks)
    assert not any(c.HasField("final") for c in chunks)
    async with asyncio.timeout(5):
        while not redis_db.xlen("strata:{t:watched}:guardrails"):
            await asyncio.sleep(0.01)
    events: Any = redis_db.xrange("strata:{t:watched}:guardrails")
    [(_, event)] = events
    assert (event[b"phase"], event[b"rule"]) == (b"output", b"secret.aws_access_key")


async def test_a_whole_answer_is_checked_before_it_is_sent(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    blocked = orchestrator_pb2.GenerateRequest(
        model="mock-fast", messages=[user(f"repeat {SECRET} please")]
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await orchestrator.stub.Generate(blocked, metadata=bearer(test_keys.watched))
    assert rich_error(caught.value).reason == "GUARDRAIL_BLOCKED"
    redacted = orchestrator_pb2.GenerateRequest(
        model="mock-fast", messages=[user("repeat ada@example.com please")]
    )
    reply = await orchestrator.stub.Generate(redacted, metadata=bearer(test_keys.watched))
    assert "ada@example.com" not in reply.text
    assert "[REDACTED:EMAIL]" in reply.text


async def test_personal_data_is_redacted_before_the_model_sees_it(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    # The default profile redacts personal data in prompts; the mock repeats what it got.
    reply = await orchestrator.stub.Generate(
        orchestrator_pb2.GenerateRequest(
            model="mock-fast", messages=[user("mail ada@example.com today")]
        ),
        metadata=bearer(test_keys.acme),
    )
    assert "ada@example.com" not in reply.text
    assert "[REDACTED:EMAIL]" in reply.text
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await orchestrator.stub.Generate(
            orchestrator_pb2.GenerateRequest(model="mock-fast", messages=[user(f"key {SECRET}")]),
            metadata=bearer(test_keys.acme),
        )
    assert rich_error(caught.value).metadata["phase"] == "input"


async def test_a_batch_request_is_refused_first(orchestrator: Served, test_keys: ApiKeys) -> None:
    batch = ask(model="mock-fast", priority=common_pb2.PRIORITY_BATCH)
    for _ in range(2):  # acme-tight allows 3 a minute; batch may use 80% of that: 2
        await stream(orchestrator, test_keys.tight, batch)
    limited = await failure(orchestrator, test_keys.tight, batch)
    assert limited.reason == "RATE_LIMITED"
    chunks = await stream(orchestrator, test_keys.tight, ask(model="mock-fast"))
    assert chunks[-1].HasField("final")


async def test_a_cost_ceiling_below_every_candidate_is_refused(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    error = await failure(orchestrator, test_keys.acme, ask(model="up-ok", max_cost_usd_micros=1))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "COST_CEILING_EXCEEDED")


async def test_a_paraphrase_streams_back_from_the_cache_by_meaning(
    orchestrator: Served, test_keys: ApiKeys
) -> None:
    params = {"temperature": 0}
    first = await stream(
        orchestrator, test_keys.acme, ask("How do I reset my password?", params=params)
    )
    # The answer is stored after the reply; the same question again waits for that store
    # (this replica knows it is under way) and is an exact hit.
    repeat = await stream(
        orchestrator, test_keys.acme, ask("How do I reset my password?", params=params)
    )
    assert (repeat[0].start.cache_status, repeat[0].start.cache_match) == (
        HIT,
        common_pb2.CACHE_MATCH_EXACT,
    )
    again = await stream(
        orchestrator, test_keys.acme, ask("How can I reset my password?", params=params)
    )
    assert first[0].start.cache_status == MISS
    start = again[0].start
    assert (start.cache_status, start.cache_match) == (HIT, common_pb2.CACHE_MATCH_SEMANTIC)
    assert text_of(again) == text_of(first)
    assert len([c for c in again if c.HasField("delta")]) > 1  # streamed like a live answer
    opted_out = ask("How could I reset my password?", params=params)
    opted_out.cache_policy.semantic_disabled = True
    assert (await stream(orchestrator, test_keys.acme, opted_out))[0].start.cache_status == MISS


@pytest.mark.parametrize("linger_s", [None, 1.0], ids=["default-linger", "long-linger"])
async def test_a_client_at_its_concurrency_limit_sends_its_next_request_at_once(
    start_orchestrator: StartOrchestrator,
    control: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    linger_s: float | None,
) -> None:
    """An answered request holds its reservation until its settlement (after the reply)
    lands; a tenant allowed one request at a time that asks again at once is not refused
    for the request it was just answered. A settlement waiting for others to go with it
    goes at once then: here the wait would outlast the refused request's patience."""
    if linger_s is not None:
        monkeypatch.setattr(generation, "SETTLEMENT_WAIT_S", linger_s / 5)
    orchestrator = await start_orchestrator(
        **({} if linger_s is None else {"after_reply_linger_s": linger_s})
    )
    admin = admin_pb2_grpc.ControlAdminServiceStub(control.channel)
    await admin.SetLimits(
        admin_pb2.SetLimitsRequest(
            request_id=uuid.uuid4().hex,
            tenant_id="globex",
            scope=admin_pb2.SCOPE_TENANT,
            max_concurrent=1,
        ),
        metadata=bearer(ADMIN_TOKEN),
    )
    for n in range(16):
        reply = await orchestrator.stub.Generate(
            orchestrator_pb2.GenerateRequest(
                model="mock-fast", messages=[user(f"one at a time {n} {uuid.uuid4().hex}")]
            ),
            metadata=bearer(test_keys.globex),
        )
        assert reply.text
        chunks = await stream(orchestrator, test_keys.globex, ask(f"streamed {n}"))
        assert chunks[-1].HasField("final")
    # And the limit still holds for requests that really overlap.
    slow = [
        stream(orchestrator, test_keys.globex, ask(f"together {n}", model="mock-small"))
        for n in range(3)
    ]
    results = await asyncio.gather(*slow, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert refused and all(rich_error(r).reason == "CONCURRENCY_LIMITED" for r in refused)
    await eventually(lambda: reserved(redis_db, "globex") == 0)


async def test_an_embedding_s_settlement_waits_for_no_linger(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    """Embed replies once its usage is settled: that settlement goes at once, where one
    sent after a reply may wait (here a whole second, past the call's deadline) for others
    to go with it."""
    orchestrator = await start_orchestrator(after_reply_linger_s=1.0)
    embedded = await orchestrator.stub.Embed(
        orchestrator_pb2.EmbedRequest(model="mock-embed", inputs=["one", "two"]),
        metadata=bearer(test_keys.acme),
        timeout=0.75,
    )
    assert len(embedded.embeddings) == 2
    usage = usage_record(redis_db)
    assert usage["requests"] == 1 and usage["spent"] == embedded.cost.total_usd_micros
