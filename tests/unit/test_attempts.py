"""The attempt engine: retries only before the answer, within deadline and budget; hedging."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from services.common.calls import Deadline
from services.common.catalog import ModelConfig, RetryBudgetConfig
from services.common.errors import (
    BadUpstreamResponse,
    ProviderUnavailable,
    StreamInterrupted,
    UpstreamQuotaExhausted,
    UpstreamRateLimited,
    UpstreamTimeout,
)
from services.executor.attempts import Attempts, RetryBudget
from services.executor.providers.base import (
    Accepted,
    Completion,
    Event,
    Finished,
    ProviderRequest,
    TextDelta,
)
from strata.common.v1 import common_pb2
from tests.helpers import user

DONE = Finished(common_pb2.FINISH_REASON_STOP, common_pb2.Usage(output_tokens=2), "m")


class Scripted:
    """A provider whose successive attempts follow scripts of events, delays and errors."""

    def __init__(self, *scripts: list[Any]) -> None:
        self.scripts = list(scripts)
        self.started = 0
        self.closed = 0

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Event, None]:
        script = self.scripts[min(self.started, len(self.scripts) - 1)]
        self.started += 1
        try:
            for step in script:
                if isinstance(step, BaseException):
                    raise step
                if isinstance(step, float):
                    await asyncio.sleep(step)
                    continue
                yield step
        finally:
            self.closed += 1

    async def complete(self, request: ProviderRequest) -> Completion:
        parts = []
        async for event in self.stream(request):
            if isinstance(event, TextDelta):
                parts.append(event.text)
        return Completion("".join(parts), common_pb2.FINISH_REASON_STOP, common_pb2.Usage(), "m")

    async def embed(self, *args: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


def request(deadline_s: float = 10, **model: Any) -> ProviderRequest:
    config = ModelConfig.model_validate(
        {
            "name": "m",
            "provider": "p",
            "upstream_model": "m",
            "retry": {"max_attempts": 3, "base_delay_s": 0.01, "max_delay_s": 0.02},
            **model,
        }
    )
    return ProviderRequest(
        model=config,
        messages=[user("hi")],
        params=common_pb2.GenerationParams(),
        max_output_tokens=10,
        deadline=Deadline.after(deadline_s),
        request_id="r",
    )


def engine(provider: Scripted, **budget: Any) -> Attempts:
    config = RetryBudgetConfig(**{"min_retries": 100, **budget})
    return Attempts(provider, RetryBudget(config))


async def run(attempts: Attempts, req: ProviderRequest) -> list[Event]:
    return [event async for event in attempts.stream(req)]


async def test_a_failure_before_the_answer_is_retried() -> None:
    provider = Scripted(
        [Accepted(), ProviderUnavailable("500")], [Accepted(), TextDelta("a"), DONE]
    )
    events = await run(engine(provider), request())
    assert events == [TextDelta("a"), DONE]
    assert (provider.started, provider.closed) == (2, 2)


async def test_a_failure_after_the_answer_started_is_not_retried() -> None:
    provider = Scripted([TextDelta("a"), ProviderUnavailable("cut")], [TextDelta("b"), DONE])
    received = []
    with pytest.raises(ProviderUnavailable):
        async for event in engine(provider).stream(request()):
            received.append(event)
    assert received == [TextDelta("a")]
    assert provider.started == 1


@pytest.mark.parametrize(
    "error",
    [
        UpstreamQuotaExhausted("quota"),
        BadUpstreamResponse("garbage"),
    ],
    ids=["quota", "malformed"],
)
async def test_errors_that_cannot_heal_are_not_retried(error: Exception) -> None:
    provider = Scripted([error], [DONE])
    with pytest.raises(type(error)):
        await run(engine(provider), request())
    assert provider.started == 1


async def test_attempts_stop_at_the_limit() -> None:
    provider = Scripted([ProviderUnavailable("500")])
    with pytest.raises(ProviderUnavailable):
        await run(engine(provider), request())
    assert provider.started == 3


async def test_retry_after_is_honoured() -> None:
    limited = UpstreamRateLimited("429", retry_after_s=0.3)
    provider = Scripted([limited], [DONE])
    loop = asyncio.get_running_loop()
    started = loop.time()
    await run(engine(provider), request())
    assert loop.time() - started >= 0.3
    assert provider.started == 2


async def test_no_retry_when_retry_after_exceeds_the_deadline() -> None:
    limited = UpstreamRateLimited("429", retry_after_s=5)
    provider = Scripted([limited], [DONE])
    with pytest.raises(UpstreamRateLimited):
        await run(engine(provider), request(deadline_s=1))
    assert provider.started == 1


async def test_backoff_uses_full_jitter_up_to_the_doubling_cap() -> None:
    bounds: list[tuple[float, float]] = []

    def jitter(low: float, high: float) -> float:
        bounds.append((low, high))
        return 0.0

    provider = Scripted([ProviderUnavailable("500")])
    attempts = Attempts(provider, RetryBudget(RetryBudgetConfig(min_retries=100)), jitter=jitter)
    with pytest.raises(ProviderUnavailable):
        await run(attempts, request(retry={"max_attempts": 4, "base_delay_s": 1, "max_delay_s": 3}))
    assert bounds == [(0.0, 1.0), (0.0, 2.0), (0.0, 3.0)]


async def test_first_token_timeout_is_retried_then_reported() -> None:
    provider = Scripted([Accepted(), 5.0, DONE])
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamTimeout):
        await run(engine(provider), request(timeouts={"first_token_s": 0.1}))
    assert provider.started == 3
    assert provider.closed == 3
    assert loop.time() - started < 2


async def test_a_stall_after_the_answer_started_interrupts_the_stream() -> None:
    provider = Scripted([TextDelta("a"), 5.0, DONE])
    received = []
    with pytest.raises(StreamInterrupted):
        async for event in engine(provider).stream(request(timeouts={"stall_s": 0.1})):
            received.append(event)
    assert received == [TextDelta("a")]
    assert (provider.started, provider.closed) == (1, 1)


async def test_hedging_races_a_second_attempt_and_closes_the_loser() -> None:
    provider = Scripted([Accepted(), 5.0, TextDelta("slow"), DONE], [TextDelta("fast"), DONE])
    events = await run(engine(provider), request(hedge_after_s=0.1))
    assert events == [TextDelta("fast"), DONE]
    assert provider.started == 2
    assert provider.closed == 2


async def test_no_hedge_when_the_first_attempt_answers_in_time() -> None:
    provider = Scripted([TextDelta("quick"), DONE], [TextDelta("never"), DONE])
    assert await run(engine(provider), request(hedge_after_s=0.5)) == [TextDelta("quick"), DONE]
    assert provider.started == 1


async def test_the_retry_budget_caps_retries_at_its_share_of_requests() -> None:
    provider = Scripted([ProviderUnavailable("500")])
    attempts = engine(provider, ratio=0.1, min_retries=0, window_s=60)
    for _ in range(20):
        with pytest.raises(ProviderUnavailable):
            await run(attempts, request())
    # 20 requests: at most 10% of them may be retries.
    assert provider.started - 20 == 2


async def test_budget_window_forgets_old_requests() -> None:
    now = [0.0]
    budget = RetryBudget(RetryBudgetConfig(ratio=0.5, window_s=10, min_retries=0), lambda: now[0])
    for _ in range(4):
        budget.record_request()
    assert [budget.try_spend() for _ in range(3)] == [True, True, False]
    now[0] = 11.0
    assert not budget.try_spend()  # the window emptied: no requests, no retries
    budget.record_request()
    budget.record_request()
    assert budget.try_spend()


async def test_unary_complete_is_retried_too() -> None:
    provider = Scripted([ProviderUnavailable("500")], [TextDelta("ok"), DONE])
    answer = await engine(provider).complete(request())
    assert answer.text == "ok"
    assert provider.started == 2


async def test_cancelling_closes_the_attempt() -> None:
    provider = Scripted([TextDelta("a"), 10.0, DONE])
    stream = engine(provider).stream(request())
    assert await anext(stream) == TextDelta("a")
    task = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stream.aclose()
    assert provider.closed == 1
