"""The deterministic mock provider: stable answers, limits, stop sequences, failure modes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import pytest

from services.common.calls import Deadline
from services.common.catalog import ModelConfig
from services.common.errors import (
    BadUpstreamResponse,
    ProviderUnavailable,
    StreamInterrupted,
    UpstreamRateLimited,
)
from services.executor.providers.base import (
    Accepted,
    Event,
    Finished,
    ProviderRequest,
    TextDelta,
)
from services.executor.providers.mock import MockProvider
from strata.common.v1 import common_pb2

QUESTION = "What does Strata do with a request?"


def user(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)


def system(text: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_SYSTEM, content=text)


def make_request(
    *,
    upstream_model: str = "echo",
    messages: Sequence[common_pb2.ChatMessage] = (),
    seed: int | None = None,
    stop: Sequence[str] = (),
    max_output_tokens: int = 1024,
    options: dict[str, Any] | None = None,
) -> ProviderRequest:
    params = common_pb2.GenerationParams(stop=list(stop))
    if seed is not None:
        params.seed = seed
    return ProviderRequest(
        model=ModelConfig(
            name="mock-small",
            provider="mock",
            upstream_model=upstream_model,
            options=options or {},
        ),
        messages=list(messages) or [user(QUESTION)],
        params=params,
        max_output_tokens=max_output_tokens,
        deadline=Deadline.after(30),
        request_id="req-mock-1",
    )


async def collect(request: ProviderRequest) -> list[Event]:
    return [event async for event in MockProvider().stream(request)]


async def drain(stream: AsyncIterator[Event], into: list[Event]) -> None:
    """Appends the stream's events to `into`, so they survive an error that ends it."""
    async for event in stream:
        into.append(event)


def text_of(events: Sequence[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def finished(events: Sequence[Event]) -> Finished:
    last = events[-1]
    assert isinstance(last, Finished)
    return last


async def test_same_request_gives_identical_deltas_and_usage():
    first = await collect(make_request(seed=7))
    second = await collect(make_request(seed=7))

    assert [e for e in first if isinstance(e, TextDelta)]
    assert first == second
    assert finished(first).usage == finished(second).usage
    assert finished(first).usage.output_tokens > 0
    assert finished(first).usage.input_tokens > 0


async def test_different_seed_gives_different_text():
    texts = {text_of(await collect(make_request(seed=seed))) for seed in (1, 2)}

    assert len(texts) == 2


async def test_earlier_messages_change_the_answer_not_only_the_last_one():
    plain = await collect(make_request(messages=[user(QUESTION)]))
    framed = await collect(make_request(messages=[system("Answer briefly."), user(QUESTION)]))

    assert text_of(plain) != text_of(framed)


async def test_different_question_gives_different_text():
    one = await collect(make_request(messages=[user("How are limits enforced?")]))
    other = await collect(make_request(messages=[user("Where do cached answers live?")]))

    assert text_of(one) != text_of(other)


@pytest.mark.parametrize("words_per_chunk", [1, 3])
async def test_deltas_concatenate_to_the_complete_text(words_per_chunk):
    request = make_request(options={"words_per_chunk": words_per_chunk})

    events = await collect(request)
    completion = await MockProvider().complete(request)

    assert text_of(events) == completion.text
    assert completion.text
    assert finished(events).usage == completion.usage
    assert finished(events).finish_reason == completion.finish_reason
    assert finished(events).provider_model == completion.provider_model == "mock/echo"


async def test_words_per_chunk_groups_words_into_fewer_deltas():
    one = [e for e in await collect(make_request()) if isinstance(e, TextDelta)]
    three = [
        e
        for e in await collect(make_request(options={"words_per_chunk": 3}))
        if isinstance(e, TextDelta)
    ]

    assert len(three) == -(-len(one) // 3)


async def test_accepted_first_and_exactly_one_finished_last():
    events = await collect(make_request())

    assert isinstance(events[0], Accepted)
    assert sum(isinstance(e, Accepted) for e in events) == 1
    assert sum(isinstance(e, Finished) for e in events) == 1
    assert all(isinstance(e, TextDelta) for e in events[1:-1])
    last = finished(events)
    assert last.finish_reason == common_pb2.FINISH_REASON_STOP
    assert last.usage.output_tokens == len(text_of(events).split())


async def test_max_output_tokens_cuts_the_answer_with_finish_length():
    full = await collect(make_request())
    full_words = text_of(full).split()
    limit = 5
    assert len(full_words) > limit

    events = await collect(make_request(max_output_tokens=limit))

    assert finished(events).usage.output_tokens == limit
    assert finished(events).finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert text_of(events).split() == full_words[:limit]


async def test_stop_sequence_cuts_the_text_before_it():
    full = text_of(await collect(make_request()))
    stop = "cancellation"
    assert stop in full

    completion = await MockProvider().complete(make_request(stop=["never-in-the-answer", stop]))

    assert completion.text == full[: full.index(stop)]
    assert stop not in completion.text
    assert completion.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_stop_sequence_within_the_token_limit_wins_over_length():
    full = text_of(await collect(make_request()))
    stop = "answer"
    assert full.index(stop) < len(" ".join(full.split()[:5]))

    completion = await MockProvider().complete(make_request(stop=[stop], max_output_tokens=5))

    assert completion.text == full[: full.index(stop)]
    assert completion.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_stop_sequence_at_a_word_boundary_counts_only_words_sent():
    events = await collect(make_request(stop=["answer"]))

    assert text_of(events).split() == ["Mock"]
    assert finished(events).usage.output_tokens == 1


async def test_rate_limited_raises_with_retry_after_from_options():
    request = make_request(upstream_model="rate-limited", options={"retry_after_s": 7})
    events: list[Event] = []
    with pytest.raises(UpstreamRateLimited) as info:
        await drain(MockProvider().stream(request), events)

    assert events == []
    assert info.value.retry_after_s == 7.0
    assert info.value.reason == "UPSTREAM_RATE_LIMITED"
    assert info.value.metadata["retry_after_ms"] == "7000"


async def test_rate_limited_defaults_to_two_seconds():
    with pytest.raises(UpstreamRateLimited) as info:
        await MockProvider().complete(make_request(upstream_model="rate-limited"))

    assert info.value.retry_after_s == 2.0


async def test_error_raises_provider_unavailable():
    with pytest.raises(ProviderUnavailable) as info:
        await collect(make_request(upstream_model="error"))

    assert info.value.reason == "PROVIDER_UNAVAILABLE"


async def test_malformed_raises_protocol_error():
    with pytest.raises(BadUpstreamResponse) as info:
        await MockProvider().complete(make_request(upstream_model="malformed"))

    assert info.value.reason == "BAD_UPSTREAM_RESPONSE"


async def test_cut_sends_some_deltas_then_interrupts():
    events: list[Event] = []
    with pytest.raises(StreamInterrupted) as info:
        await drain(MockProvider().stream(make_request(upstream_model="cut")), events)

    assert info.value.reason == "STREAM_INTERRUPTED"
    assert isinstance(events[0], Accepted)
    assert len(events) > 1
    assert all(isinstance(e, TextDelta) for e in events[1:])


async def test_cut_complete_raises_stream_interrupted():
    with pytest.raises(StreamInterrupted):
        await MockProvider().complete(make_request(upstream_model="cut"))


async def test_hang_accepts_then_never_sends_anything():
    async with aclosing(MockProvider().stream(make_request(upstream_model="hang"))) as stream:
        assert isinstance(await anext(stream), Accepted)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(anext(stream), timeout=0.05)
