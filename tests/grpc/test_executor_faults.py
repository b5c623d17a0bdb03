"""The executor against a real HTTP upstream that fails on purpose.

For each fault: what the caller gets, how many attempts reached the upstream, and that
nothing is left behind (no request still open at the upstream, no task still running).
"""

from __future__ import annotations

import asyncio
import time
import types
import uuid
from typing import Any

import grpc
import pytest

from services.executor import tokens
from strata.common.v1 import common_pb2
from strata.executor.v1 import executor_pb2
from tests.fakes.openai_upstream import FakeOpenAI
from tests.grpc.conftest import Served
from tests.helpers import rich_error, user


def ask(model: str) -> tuple[executor_pb2.StreamCompleteRequest, str]:
    marker = uuid.uuid4().hex
    request = executor_pb2.StreamCompleteRequest(
        request_id=marker, model=model, messages=[user(f"fault {marker}")]
    )
    return request, marker


def python_tasks(baseline: set[asyncio.Task[Any]]) -> set[asyncio.Task[Any]]:
    """Tasks started since the baseline that run Python code (gRPC's own run compiled code)."""
    return {
        task
        for task in asyncio.all_tasks() - baseline - {asyncio.current_task()}
        if isinstance(task.get_coro(), types.CoroutineType)
    }


async def settled(upstream: FakeOpenAI, baseline: set[asyncio.Task[Any]]) -> None:
    """Nothing left behind: no open request upstream, no task beyond those before the call."""
    assert await asyncio.to_thread(upstream.wait_idle, 5), "an upstream request is still open"
    async with asyncio.timeout(5):
        while python_tasks(baseline):
            await asyncio.sleep(0.01)


@pytest.fixture
async def baseline(executor: Served) -> set[asyncio.Task[Any]]:
    await executor.stub.ListModels(executor_pb2.ListModelsRequest())
    return set(asyncio.all_tasks())


async def outcome(executor: Served, request: Any, timeout: float = 10) -> tuple[list[Any], Any]:
    chunks: list[Any] = []
    try:
        async for chunk in executor.stub.StreamComplete(request, timeout=timeout):
            chunks.append(chunk)
    except grpc.aio.AioRpcError as err:
        return chunks, rich_error(err)
    return chunks, None


@pytest.mark.parametrize(
    ("model", "attempts", "code", "reason"),
    [
        ("up-500-once", 2, None, None),
        ("up-429-once", 2, None, None),
        ("up-slow-first-once", 2, None, None),
        ("up-500", 3, grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("up-quota", 1, grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_QUOTA_EXHAUSTED"),
        ("up-malformed", 1, grpc.StatusCode.UNAVAILABLE, "BAD_UPSTREAM_RESPONSE"),
        ("up-slow-first", 3, grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT"),
    ],
)
async def test_faults_before_the_answer(
    executor: Served,
    upstream: FakeOpenAI,
    baseline: set[asyncio.Task[Any]],
    model: str,
    attempts: int,
    code: grpc.StatusCode | None,
    reason: str | None,
) -> None:
    request, marker = ask(model)
    chunks, error = await outcome(executor, request)
    assert len(upstream.calls(marker)) == attempts
    if code is None:
        assert error is None
        assert chunks[0].HasField("start")
        assert chunks[-1].final.finish_reason == common_pb2.FINISH_REASON_STOP
    else:
        assert (error.code, error.reason) == (code, reason)
        assert chunks == []
    await settled(upstream, baseline)


async def test_retry_after_is_waited_for(executor: Served, upstream: FakeOpenAI) -> None:
    request, marker = ask("up-429-once")
    await outcome(executor, request)
    first, second = upstream.calls(marker)
    assert second.arrived_at - first.arrived_at >= 0.2


async def test_a_retry_after_beyond_the_deadline_is_not_waited_for(
    executor: Served, upstream: FakeOpenAI, baseline: set[asyncio.Task[Any]]
) -> None:
    request, marker = ask("up-429")
    started = time.monotonic()
    _, error = await outcome(executor, request, timeout=2)
    assert (error.reason, error.retry_delay_s) == ("UPSTREAM_RATE_LIMITED", 3)
    assert len(upstream.calls(marker)) == 1
    assert time.monotonic() - started < 1
    await settled(upstream, baseline)


async def test_a_hanging_upstream_is_cut_at_the_deadline(
    executor: Served, upstream: FakeOpenAI, baseline: set[asyncio.Task[Any]]
) -> None:
    request, marker = ask("up-hang")
    started = time.monotonic()
    _, error = await outcome(executor, request, timeout=1.5)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.5
    assert 1 <= len(upstream.calls(marker)) <= 2
    await settled(upstream, baseline)


async def test_hedging_answers_from_the_second_attempt_and_closes_the_first(
    executor: Served, upstream: FakeOpenAI, baseline: set[asyncio.Task[Any]]
) -> None:
    request, marker = ask("up-hedged")
    started = time.monotonic()
    chunks, error = await outcome(executor, request)
    assert error is None
    assert chunks[-1].HasField("final")
    assert time.monotonic() - started < 1.5  # the slow first attempt takes 2 s
    slow, fast = upstream.calls(marker)
    assert slow.disconnected.wait(1)
    assert fast.sent
    await settled(upstream, baseline)


async def test_a_cut_after_output_is_interrupted_with_the_usage_so_far(
    executor: Served, upstream: FakeOpenAI, baseline: set[asyncio.Task[Any]]
) -> None:
    request, marker = ask("up-cut")
    chunks, error = await outcome(executor, request)
    assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "STREAM_INTERRUPTED")
    [exchange] = upstream.calls(marker)
    deltas = [c.delta.text for c in chunks if c.HasField("delta")]
    assert "".join(deltas) == "".join(exchange.sent)  # every chunk sent before the cut
    expected = tokens.estimate_usage(request.messages, "".join(deltas))
    assert error.metadata["input_tokens"] == str(expected.input_tokens)
    assert error.metadata["output_tokens"] == str(expected.output_tokens)
    assert error.metadata["usage_estimated"] == "true"
    await settled(upstream, baseline)


async def test_missing_usage_is_counted_with_the_tokenizer(
    executor: Served, upstream: FakeOpenAI
) -> None:
    request, _ = ask("up-no-usage")
    chunks, error = await outcome(executor, request)
    assert error is None
    text = "".join(c.delta.text for c in chunks if c.HasField("delta"))
    usage = chunks[-1].final.usage
    assert usage == tokens.estimate_usage(request.messages, text)
    assert usage.estimated


async def test_the_upstream_sees_a_cancel_within_100_ms(
    executor: Served, upstream: FakeOpenAI, baseline: set[asyncio.Task[Any]]
) -> None:
    request, marker = ask("up-slow")
    call = executor.stub.StreamComplete(request, timeout=30)
    deltas = 0
    async for chunk in call:
        deltas += chunk.HasField("delta")
        if deltas == 3:
            break
    cancelled_at = time.monotonic()
    call.cancel()
    [exchange] = upstream.calls(marker)
    assert await asyncio.to_thread(exchange.disconnected.wait, 5)
    assert exchange.disconnected_at is not None
    assert exchange.disconnected_at - cancelled_at < 0.1
    await settled(upstream, baseline)
