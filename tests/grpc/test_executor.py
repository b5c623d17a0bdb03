"""The executor through real stubs: the mock provider and a real HTTP upstream."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import grpc
import pytest

from strata.common.v1 import common_pb2
from strata.executor.v1 import executor_pb2
from tests.fakes.openai_upstream import FakeOpenAI
from tests.grpc.conftest import Served
from tests.helpers import rich_error, user


def stream_request(model: str, text: str = "Tell me about Strata", **params: Any):
    return executor_pb2.StreamCompleteRequest(
        request_id=uuid.uuid4().hex,
        model=model,
        messages=[user(text)],
        params=common_pb2.GenerationParams(**params),
    )


async def collect(executor: Served, request, timeout: float = 10):
    return [c async for c in executor.stub.StreamComplete(request, timeout=timeout)]


async def test_stream_is_start_deltas_then_one_final(executor: Served) -> None:
    chunks = await collect(executor, stream_request("mock-fast"))
    kinds = [c.WhichOneof("chunk") for c in chunks]
    assert kinds[0] == "start" and kinds[-1] == "final"
    assert set(kinds[1:-1]) == {"delta"}
    final = chunks[-1].final
    assert chunks[0].start.model == "mock-fast"
    assert final.finish_reason == common_pb2.FINISH_REASON_STOP
    assert final.usage.output_tokens == len(kinds) - 2
    # mock-fast: $0.15 in / $0.60 out per million tokens, each part rounded up.
    assert final.cost.input_usd_micros == -(-final.usage.input_tokens * 150_000 // 1_000_000)
    assert final.cost.output_usd_micros == -(-final.usage.output_tokens * 600_000 // 1_000_000)


async def test_unary_answer_equals_the_streamed_one(executor: Served) -> None:
    request = stream_request("mock-fast", seed=7)
    chunks = await collect(executor, request)
    whole = await executor.stub.Complete(
        executor_pb2.CompleteRequest(
            request_id="r", model=request.model, messages=request.messages, params=request.params
        )
    )
    assert whole.text == "".join(c.delta.text for c in chunks if c.HasField("delta"))
    assert whole.usage == chunks[-1].final.usage
    assert whole.cost == chunks[-1].final.cost


async def test_max_output_tokens_cuts_with_length(executor: Served) -> None:
    chunks = await collect(executor, stream_request("mock-fast", max_output_tokens=3))
    assert len([c for c in chunks if c.HasField("delta")]) == 3
    assert chunks[-1].final.finish_reason == common_pb2.FINISH_REASON_LENGTH


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        ("mock-error", grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE"),
        ("mock-rate-limited", grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"),
        ("mock-malformed", grpc.StatusCode.UNAVAILABLE, "BAD_UPSTREAM_RESPONSE"),
        ("nope", grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND"),
    ],
)
async def test_failures_have_codes_and_reasons(
    executor: Served, model: str, code: grpc.StatusCode, reason: str
) -> None:
    # 1.5 s: the mock's 2 s Retry-After does not fit, so it is not waited for.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(executor, stream_request(model), timeout=1.5)
    error = rich_error(caught.value)
    assert (error.code, error.reason) == (code, reason)
    if reason == "UPSTREAM_RATE_LIMITED":
        assert error.retry_delay_s == 2


async def test_cut_stream_is_an_error_never_a_short_answer(executor: Served) -> None:
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in executor.stub.StreamComplete(stream_request("mock-cut"), timeout=10):
            received.append(chunk.WhichOneof("chunk"))
    assert "delta" in received
    assert "final" not in received
    assert rich_error(caught.value).reason == "STREAM_INTERRUPTED"


async def test_deadline_bounds_a_hanging_provider(executor: Served) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(executor, stream_request("mock-hang"), timeout=0.5)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


async def test_invalid_request_lists_violations(executor: Served) -> None:
    request = stream_request("mock-fast", max_output_tokens=0, temperature=3)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(executor, request)
    error = rich_error(caught.value)
    assert error.reason == "REQUEST_INVALID"
    assert sorted(error.field_violations) == ["params.max_output_tokens", "params.temperature"]


async def test_list_models_pages_through_the_catalog(executor: Served) -> None:
    seen, token = [], ""
    while True:
        page = await executor.stub.ListModels(
            executor_pb2.ListModelsRequest(page_size=4, page_token=token)
        )
        assert len(page.models) <= 4
        seen += [m.name for m in page.models]
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert {"mock-small", "up-ok"} <= set(seen)
    everything = await executor.stub.ListModels(executor_pb2.ListModelsRequest())
    up = next(m for m in everything.models if m.name == "up-ok")
    assert (up.provider, up.upstream_model) == ("fake", "fake-ok")
    assert up.input_usd_micros_per_million_tokens == 2_500_000


async def test_openai_compatible_upstream_streams_whole(
    executor: Served, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    chunks = await collect(executor, stream_request("up-ok", f"about {marker}", seed=3))
    [exchange] = [e for e in upstream.calls("fake-ok") if marker in str(e.body)]
    deltas = [c.delta.text for c in chunks if c.HasField("delta")]
    assert "".join(deltas) == "".join(exchange.sent)
    final = chunks[-1].final
    assert exchange.usage is not None
    assert final.usage.input_tokens == exchange.usage["prompt_tokens"]
    assert final.usage.output_tokens == exchange.usage["completion_tokens"]
    assert final.provider_model == "fake-ok-2026"
    assert exchange.body["stream_options"] == {"include_usage": True}
    assert exchange.body["seed"] == 3
    assert exchange.headers.get("x-strata-test") == "1"


async def test_chunks_that_arrive_together_go_on_as_one_delta(
    executor: Served, upstream: FakeOpenAI
) -> None:
    """The fake sends a whole answer at once: fewer deltas than upstream chunks, the same
    text, and every delta passed on as soon as it arrived (nothing waits for more)."""
    marker = uuid.uuid4().hex
    chunks = await collect(executor, stream_request("up-ok", f"burst {marker}"))
    [exchange] = upstream.calls(marker)
    deltas = [c.delta.text for c in chunks if c.HasField("delta")]
    assert 1 <= len(deltas) < len(exchange.sent)
    assert "".join(deltas) == "".join(exchange.sent)


async def test_paced_chunks_go_on_one_by_one_as_they_come(
    executor: Served, upstream: FakeOpenAI
) -> None:
    """Chunks 50 ms apart are never held back to be joined: each is a delta of its own,
    passed on before the next one is sent."""
    marker = uuid.uuid4().hex
    call = executor.stub.StreamComplete(stream_request("up-slow", marker), timeout=30)
    deltas: list[str] = []
    async for chunk in call:
        if chunk.HasField("delta"):
            deltas.append(chunk.delta.text)
            if len(deltas) == 5:
                break
    [exchange] = upstream.calls(marker)
    sent_by_then = len(exchange.sent)
    call.cancel()
    assert deltas == exchange.sent[:5]
    assert sent_by_then <= 7  # the fifth delta came while the upstream was still sending


async def test_streams_one_after_another_reuse_one_upstream_connection(
    executor: Served, upstream: FakeOpenAI
) -> None:
    """The body is read to its end after [DONE], so the connection goes back to the pool
    (a response left unread closes it, and every stream would pay a new connection)."""
    marker = uuid.uuid4().hex
    for n in range(4):
        chunks = await collect(executor, stream_request("up-ok", f"reuse {marker} {n}"))
        assert chunks[-1].HasField("final")
    peers = {e.peer for e in upstream.calls(marker)}
    assert len(upstream.calls(marker)) == 4 and len(peers) == 1, peers


async def test_whole_answers_one_after_another_reuse_one_upstream_connection(
    executor: Served, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    for n in range(4):
        answer = await executor.stub.Complete(
            executor_pb2.CompleteRequest(
                request_id=uuid.uuid4().hex, model="up-ok", messages=[user(f"{marker} {n}")]
            ),
            timeout=10,
        )
        assert answer.finish_reason == common_pb2.FINISH_REASON_STOP
    peers = {e.peer for e in upstream.calls(marker)}
    assert len(upstream.calls(marker)) == 4 and len(peers) == 1, peers


async def test_an_unreachable_upstream_is_provider_unavailable(executor: Served) -> None:
    """Connection refused is the provider being down (another model may answer), not a
    timeout and not an internal error."""
    for call in (
        collect(executor, stream_request("up-unreachable")),
        executor.stub.Complete(
            executor_pb2.CompleteRequest(
                request_id=uuid.uuid4().hex, model="up-unreachable", messages=[user("hi")]
            ),
            timeout=10,
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        error = rich_error(caught.value)
        assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "PROVIDER_UNAVAILABLE")


async def test_upstream_cut_is_stream_interrupted(executor: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(executor, stream_request("up-cut"))
    assert rich_error(caught.value).reason == "STREAM_INTERRUPTED"


async def test_upstream_429_carries_its_retry_after(executor: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(executor, stream_request("up-429"), timeout=2)
    error = rich_error(caught.value)
    assert (error.reason, error.retry_delay_s) == ("UPSTREAM_RATE_LIMITED", 3)
    assert "slow down" not in error.message  # the provider's body is never passed on


async def test_cancelling_closes_the_upstream_stream(
    executor: Served, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    call = executor.stub.StreamComplete(stream_request("up-slow", marker), timeout=30)
    deltas = 0
    async for chunk in call:
        deltas += chunk.HasField("delta")
        if deltas == 3:
            break
    call.cancel()
    [exchange] = [e for e in upstream.calls("fake-slow") if marker in str(e.body)]
    assert await asyncio.to_thread(exchange.disconnected.wait, 5)
    assert len(exchange.sent) < 50


async def test_embed_gives_unit_vectors_closer_for_shared_words(executor: Served) -> None:
    texts = ["track my order", "track my parcel order", "bake a chocolate cake"]
    reply = await executor.stub.Embed(
        executor_pb2.EmbedRequest(request_id="e", model="mock-embed", inputs=texts)
    )
    vectors = [list(e.values) for e in reply.embeddings]
    assert [len(v) for v in vectors] == [64, 64, 64]
    for v in vectors:
        assert abs(sum(x * x for x in v) - 1) < 1e-5

    def cosine(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert reply.usage.input_tokens == 11
    assert reply.cost.input_usd_micros == 1  # 11 tokens at $0.02 per million, rounded up


@pytest.mark.parametrize(
    ("model", "inputs", "code"),
    [
        ("mock-fast", ["hi"], grpc.StatusCode.INVALID_ARGUMENT),
        ("mock-embed", [], grpc.StatusCode.INVALID_ARGUMENT),
        ("mock-embed", ["ok", ""], grpc.StatusCode.INVALID_ARGUMENT),
        ("nope", ["hi"], grpc.StatusCode.NOT_FOUND),
    ],
)
async def test_embed_refuses_bad_input(
    executor: Served, model: str, inputs: list[str], code: grpc.StatusCode
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await executor.stub.Embed(
            executor_pb2.EmbedRequest(request_id="e", model=model, inputs=inputs)
        )
    assert caught.value.code() == code


async def test_an_embedding_model_cannot_chat(executor: Served) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await collect(executor, stream_request("mock-embed"))
    assert rich_error(caught.value).field_violations == ["model"]
