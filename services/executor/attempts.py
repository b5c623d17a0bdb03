"""Running one call against a provider: timeouts, retries, a retry budget, hedging.

- Each attempt has a first-token timeout (request sent → first piece of the answer) and,
  once answering, a stall timeout between pieces; both are capped by the caller's deadline.
- A failed attempt is retried only if nothing of its answer has been passed on yet, the
  error is retryable (5xx, 429, connection failures, timeouts before the answer), attempts
  remain, the backoff (full jitter, or the provider's Retry-After) fits the deadline, and
  the provider's retry budget allows it.
- Hedging (per model): if no answer has started `hedge_after_s` into the first attempt, a
  second attempt races it; the first to answer wins and the other is closed.
- The first piece of the answer commits the call: after it, a failure ends the stream as
  STREAM_INTERRUPTED and is never retried (the caller already has part of the answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, Callable

from opentelemetry import trace

from services.common import semconv, telemetry
from services.common.catalog import RetryBudgetConfig
from services.common.errors import (
    DeadlineExceeded,
    ProviderError,
    StreamInterrupted,
    UpstreamTimeout,
)
from services.executor.providers.base import (
    Accepted,
    Completion,
    Content,
    Event,
    Finished,
    Provider,
    ProviderRequest,
)

log = logging.getLogger(__name__)

MIN_ATTEMPT_S = 0.05
"""No new attempt starts with less than this left before the deadline."""


class RetryBudget:
    """Retries allowed per provider: at most `ratio` of the requests in a sliding window,
    but always `min_retries` per window, so that an outage is not multiplied by retries."""

    def __init__(
        self, config: RetryBudgetConfig, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._config = config
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        horizon = now - self._config.window_s
        for stamps in (self._requests, self._retries):
            while stamps and stamps[0] <= horizon:
                stamps.popleft()

    def record_request(self) -> None:
        """Counts a call (not its retries)."""
        now = self._clock()
        self._trim(now)
        self._requests.append(now)

    def try_spend(self) -> bool:
        """Takes one retry from the budget; False when the budget is spent."""
        now = self._clock()
        self._trim(now)
        allowed = max(self._config.min_retries, self._config.ratio * len(self._requests))
        if len(self._retries) + 1 > allowed:
            return False
        self._retries.append(now)
        return True


class Attempts:
    """Runs calls to one provider with timeouts, retries and hedging."""

    def __init__(
        self,
        provider: Provider,
        budget: RetryBudget,
        jitter: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.provider = provider
        self.budget = budget
        self._jitter = jitter

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[Content, None]:
        """The answer's pieces then Finished; raises the last ProviderError when it fails."""
        self.budget.record_request()
        attempt = 0
        while True:
            attempt += 1
            try:
                answer, first = await self._start(request, attempt)
                break
            except ProviderError as err:
                delay = self._retry_delay(err, attempt, request)
                if delay is None:
                    raise
                _retrying(request, attempt, err, delay)
                await asyncio.sleep(delay)

        async with contextlib.aclosing(answer):
            yield first
            if isinstance(first, Finished):
                return
            stall_s = request.model.timeouts.stall_s
            while True:
                wait_s = min(stall_s, _remaining(request))
                try:
                    async with asyncio.timeout(wait_s):
                        event = await anext(answer)
                except StopAsyncIteration:
                    raise StreamInterrupted("the provider's stream ended early") from None
                except TimeoutError:
                    raise StreamInterrupted(
                        f"the provider sent nothing for {wait_s:.1f}s mid-answer"
                    ) from None
                if isinstance(event, Accepted):
                    continue
                yield event
                if isinstance(event, Finished):
                    return

    async def complete(self, request: ProviderRequest) -> Completion:
        """The whole answer, with the same retry rules (hedging applies to streams only)."""
        self.budget.record_request()
        attempt = 0
        while True:
            attempt += 1
            try:
                async with asyncio.timeout(_remaining(request)):
                    return await self.provider.complete(request)
            except TimeoutError:
                raise UpstreamTimeout("the provider did not answer before the deadline") from None
            except ProviderError as err:
                delay = self._retry_delay(err, attempt, request)
                if delay is None:
                    raise
                _retrying(request, attempt, err, delay)
                await asyncio.sleep(delay)

    def _retry_delay(
        self, err: ProviderError, attempt: int, request: ProviderRequest
    ) -> float | None:
        """How long to wait before the next attempt, or None when there is none."""
        if not err.retryable or attempt >= request.model.retry.max_attempts:
            return None
        try:
            remaining = request.deadline.remaining()
        except DeadlineExceeded:
            return None
        policy = request.model.retry
        if err.retry_after_s is not None:
            delay = err.retry_after_s
        else:
            cap = min(policy.max_delay_s, policy.base_delay_s * 2 ** (attempt - 1))
            delay = self._jitter(0.0, cap)
        if delay + MIN_ATTEMPT_S >= remaining:
            return None
        if not self.budget.try_spend():
            log.warning("retry budget of the provider is spent; not retrying %s", err.reason)
            return None
        return delay

    async def _start(
        self, request: ProviderRequest, attempt: int
    ) -> tuple[AsyncGenerator[Event, None], Content]:
        """One attempt (or two, hedged) up to the first piece of the answer."""
        hedge_s = request.model.hedge_after_s
        first = _Attempt(self.provider, request)
        can_hedge = hedge_s is not None and attempt < request.model.retry.max_attempts
        if not can_hedge:
            return await first.until_answer()

        first_task = asyncio.create_task(first.until_answer())
        done, _ = await asyncio.wait({first_task}, timeout=hedge_s)
        if done or not self.budget.try_spend():
            return await first_task
        log.info("no answer after %.3fs; hedging with a second attempt", hedge_s)
        second = _Attempt(self.provider, request)
        second_task = asyncio.create_task(second.until_answer())
        tasks = [first_task, second_task]
        winner: asyncio.Task[tuple[AsyncGenerator[Event, None], Content]] | None = None
        try:
            pending: set[asyncio.Task[tuple[AsyncGenerator[Event, None], Content]]] = set(tasks)
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winner = next((t for t in tasks if t in done and t.exception() is None), None)
            if winner is None:
                raise first_task.exception() or second_task.exception()  # type: ignore[misc]
            return winner.result()
        finally:
            for task in tasks:
                if task is not winner:
                    await _discard(task)


async def _discard(task: asyncio.Task[tuple[AsyncGenerator[Event, None], Content]]) -> None:
    """Stops a losing attempt and closes its upstream stream."""
    if not task.done():
        task.cancel()
    try:
        events, _ = await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this task is being cancelled itself: pass it on
        return
    except Exception:
        return
    await events.aclose()


class _Attempt:
    """One call to the provider, driven until its answer starts."""

    def __init__(self, provider: Provider, request: ProviderRequest) -> None:
        self.request = request
        self.events = provider.stream(request)

    async def until_answer(self) -> tuple[AsyncGenerator[Event, None], Content]:
        """The open stream and its first piece; the stream is closed if this fails."""
        wait_s = min(self.request.model.timeouts.first_token_s, _remaining(self.request))
        try:
            async with asyncio.timeout(wait_s):
                async for event in self.events:
                    if not isinstance(event, Accepted):
                        return self.events, event
            raise StreamInterrupted("the provider's stream ended before answering")
        except TimeoutError:
            await self.events.aclose()
            raise UpstreamTimeout(
                f"the provider did not start answering within {wait_s:.1f}s"
            ) from None
        except BaseException:
            await self.events.aclose()
            raise


def _retrying(request: ProviderRequest, attempt: int, err: ProviderError, delay: float) -> None:
    log.info("attempt %d failed (%s); retrying in %.3fs", attempt, err.reason, delay)
    trace.get_current_span().add_event(
        "retry",
        {semconv.ATTEMPT: attempt, semconv.ERROR_TYPE: err.reason, "strata.retry.delay_s": delay},
    )
    telemetry.instruments("executor").retries.add(
        1, {semconv.MODEL: request.model.name, semconv.REASON: err.reason}
    )


def _remaining(request: ProviderRequest) -> float:
    return request.deadline.remaining()
