"""Idempotency keys and single flight through the public API.

A client's `request_id` makes a generate request idempotent within its tenant; identical
cacheable requests running at once share one model call, across orchestrator replicas.
The fake upstream counts model calls: each test's prompts carry a marker of their own.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from typing import Any
from urllib.parse import urlparse

import grpc
import pytest
import redis

from services.common.errors import CostCeilingExceeded
from services.control.admission import AdmissionControl
from services.orchestrator.idempotency import SingleFlight
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2
from tests.conftest import ApiKeys
from tests.fakes.openai_upstream import FakeOpenAI
from tests.faultproxy import Fault, FaultProxy
from tests.grpc.conftest import Served, StartOrchestrator
from tests.helpers import RichError, bearer, eventually, reserved, rich_error, usage_record, user

NO_CACHE = common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_BYPASS)
"""Keeps the response cache out of the way: a repeat can only come from its request id."""


@pytest.fixture
async def orchestrator(start_orchestrator: StartOrchestrator) -> Served:
    """An orchestrator without knowledge collections (quicker to start)."""
    return await start_orchestrator(knowledge_enabled=False)


def marked(marker: str, model: str = "up-ok", request_id: str = "", **fields: Any) -> Any:
    """A request whose prompt carries `marker`, with the cache bypassed unless `fields`
    say otherwise."""
    fields.setdefault("cache_policy", NO_CACHE)
    return orchestrator_pb2.GenerateRequest(
        model=model,
        messages=[user(f"tell me about {marker}")],
        request_id=request_id or f"idem-{uuid.uuid4().hex}",
        **fields,
    )


def as_stream(request: Any) -> Any:
    return orchestrator_pb2.StreamGenerateRequest.FromString(request.SerializeToString())


async def generate(served: Served, key: str, request: Any, timeout: float = 10) -> Any:
    return await served.stub.Generate(request, metadata=bearer(key), timeout=timeout)


async def refused(served: Served, key: str, request: Any) -> RichError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(served, key, request)
    return rich_error(caught.value)


async def test_a_completed_request_id_replays_its_answer_without_a_model_call(
    orchestrator: Served, test_keys: ApiKeys, upstream: FakeOpenAI, redis_db: redis.Redis
) -> None:
    marker = uuid.uuid4().hex
    request = marked(marker)
    first = await generate(orchestrator, test_keys.acme, request)
    assert first.request_id == request.request_id
    assert first.model == "up-ok" and first.text.startswith("Upstream1")

    again = await generate(orchestrator, test_keys.acme, request)
    assert again == first
    # The same request streamed is the same request: its answer comes back as a stream.
    chunks = [
        c
        async for c in orchestrator.stub.StreamGenerate(
            as_stream(request), metadata=bearer(test_keys.acme), timeout=10
        )
    ]
    assert chunks[0].start.request_id == request.request_id
    assert "".join(c.delta.text for c in chunks if c.HasField("delta")) == first.text
    assert chunks[-1].final.usage == first.usage and chunks[-1].final.cost == first.cost

    assert len(upstream.calls(marker)) == 1
    await eventually(lambda: reserved(redis_db) == 0)  # settled after the reply
    assert usage_record(redis_db)["requests"] == 1  # admitted, charged and settled once


async def test_a_request_id_reused_for_another_request_is_refused(
    orchestrator: Served, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    request = marked(marker)
    await generate(orchestrator, test_keys.acme, request)

    other_prompt = marked(uuid.uuid4().hex, request_id=request.request_id)
    other_params = marked(marker, request_id=request.request_id)
    other_params.params.temperature = 0.3
    for reused in (other_prompt, other_params):
        error = await refused(orchestrator, test_keys.acme, reused)
        assert (error.code, error.reason) == (
            grpc.StatusCode.FAILED_PRECONDITION,
            "IDEMPOTENCY_KEY_REUSED",
        )
        assert error.metadata == {"request_id": request.request_id}
    assert len(upstream.calls(marker)) == 1


async def test_a_request_id_reused_while_its_first_request_runs_is_refused(
    orchestrator: Served, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    slow = as_stream(marked(marker, model="up-slow-start"))
    first = orchestrator.stub.StreamGenerate(slow, metadata=bearer(test_keys.acme), timeout=10)
    async with asyncio.timeout(5):
        while not upstream.calls(marker):
            await asyncio.sleep(0.01)
    error = await refused(
        orchestrator, test_keys.acme, marked(uuid.uuid4().hex, request_id=slow.request_id)
    )
    assert error.reason == "IDEMPOTENCY_KEY_REUSED"
    first.cancel()


async def test_concurrent_repeats_of_a_request_id_share_one_model_call(
    orchestrator: Served, test_keys: ApiKeys, upstream: FakeOpenAI, redis_db: redis.Redis
) -> None:
    marker = uuid.uuid4().hex
    request = marked(marker)
    replies = await asyncio.gather(
        *(generate(orchestrator, test_keys.acme, request) for _ in range(100))
    )
    assert len(upstream.calls(marker)) == 1
    assert len({r.SerializeToString(deterministic=True) for r in replies}) == 1
    assert replies[0].request_id == request.request_id and replies[0].text
    await eventually(lambda: reserved(redis_db) == 0)  # settled after the reply
    assert usage_record(redis_db)["requests"] == 1


async def test_a_request_id_belongs_to_its_tenant(
    orchestrator: Served, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    acme_marker, globex_marker = uuid.uuid4().hex, uuid.uuid4().hex
    acme = marked(acme_marker, request_id="shared-id-1")
    globex = marked(globex_marker, request_id="shared-id-1")  # another body, another tenant
    acme_reply = await generate(orchestrator, test_keys.acme, acme)
    globex_reply = await generate(orchestrator, test_keys.globex, globex)
    assert acme_marker[:8] not in globex_reply.text
    assert len(upstream.calls(acme_marker)) == len(upstream.calls(globex_marker)) == 1

    # Each tenant's repeats replay its own answer, whichever of its keys sends them.
    assert await generate(orchestrator, test_keys.acme_second, acme) == acme_reply
    assert await generate(orchestrator, test_keys.globex, globex) == globex_reply
    error = await refused(orchestrator, test_keys.acme_second, globex)
    assert error.reason == "IDEMPOTENCY_KEY_REUSED"
    assert len(upstream.calls(acme_marker)) == len(upstream.calls(globex_marker)) == 1


async def test_a_failed_request_releases_its_id_so_a_retry_runs_again(
    orchestrator: Served, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    request = marked(marker, model="up-500")
    for attempt in (1, 2):
        error = await refused(orchestrator, test_keys.acme, request)
        assert (error.code, error.reason) == (
            grpc.StatusCode.UNAVAILABLE,
            "PROVIDER_UNAVAILABLE",
        )
        # Each run is three attempts (the model's retries), none replayed.
        assert len(upstream.calls(marker)) == 3 * attempt


async def test_a_cancelled_stream_releases_its_id(
    orchestrator: Served, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    request = marked(marker, model="up-slow")
    stream = orchestrator.stub.StreamGenerate(
        as_stream(request), metadata=bearer(test_keys.acme), timeout=10
    )
    async for chunk in stream:
        if chunk.HasField("delta"):
            break
    stream.cancel()
    # The whole answer (unary upstream calls of up-slow are quick) on a second run.
    reply = await generate(orchestrator, test_keys.acme, request)
    assert reply.text.startswith(" slow0 slow1")
    assert len(upstream.calls(marker)) == 2


async def test_an_answer_that_cannot_be_kept_for_repeats_still_ends_its_stream(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys, redis_url: str, redis_db: redis.Redis
) -> None:
    """Redis stops answering the orchestrator after the id was claimed: the answer is not
    kept for repeats, but the stream still ends with its final chunk and OK, never with an
    error after it (its client would run the request again)."""
    target = urlparse(redis_url)
    assert target.hostname and target.port
    with FaultProxy(target.hostname, target.port) as proxy:
        orchestrator = await start_orchestrator(
            knowledge_enabled=False, redis_url=f"redis://127.0.0.1:{proxy.port}{target.path}"
        )
        request = marked(uuid.uuid4().hex, model="up-slow-start")  # 2 s to its first chunk
        stream = orchestrator.stub.StreamGenerate(
            as_stream(request), metadata=bearer(test_keys.acme), timeout=10
        )

        async def chunks() -> list[Any]:
            return [chunk async for chunk in stream]

        received = asyncio.create_task(chunks())
        await eventually(lambda: redis_db.exists(f"strata:idem:{{t:acme}}:{request.request_id}"))
        proxy.set_fault(Fault.BLACKHOLE)
        answer = await received
        assert answer[-1].HasField("final")
        assert await stream.code() == grpc.StatusCode.OK
        kept: Any = redis_db.get(f"strata:idem:{{t:acme}}:{request.request_id}")
        assert kept.startswith(b"running:")


async def test_identical_requests_share_one_model_call_across_replicas(
    start_orchestrator: StartOrchestrator, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    replicas = [
        await start_orchestrator(knowledge_enabled=False),
        await start_orchestrator(knowledge_enabled=False),
    ]
    marker = uuid.uuid4().hex

    async def ask(replica: Served) -> list[Any]:
        # Distinct request ids: only the cache's single flight can join them.
        request = orchestrator_pb2.StreamGenerateRequest(
            model="up-slow-start", messages=[user(f"tell me about {marker}")]
        )
        return [
            c
            async for c in replica.stub.StreamGenerate(
                request, metadata=bearer(test_keys.acme), timeout=15
            )
        ]

    answers = await asyncio.gather(*(ask(replicas[i % 2]) for i in range(20)))
    assert len(upstream.calls(marker)) == 1
    texts = {"".join(c.delta.text for c in chunks if c.HasField("delta")) for chunks in answers}
    assert len(texts) == 1 and texts != {""}
    statuses = Counter(chunks[0].start.cache_status for chunks in answers)
    assert statuses == {common_pb2.CACHE_STATUS_MISS: 1, common_pb2.CACHE_STATUS_HIT: 19}
    assert len({chunks[0].start.request_id for chunks in answers}) == 20


def flights(redis_db: redis.Redis) -> list[Any]:
    """The single-flight locks held for acme."""
    return list(redis_db.scan_iter("strata:flight:{t:acme}:*"))


def claim_before_admitting(
    monkeypatch: pytest.MonkeyPatch, redis_db: redis.Redis, then: Any = None
) -> list[list[Any]]:
    """Control's admission waits until a single-flight lock is held (the orchestrator sent
    its claim beside the admission), then decides, or raises `then`. Gives the locks seen."""
    seen: list[list[Any]] = []
    admit = AdmissionControl.admit

    async def after_the_claim(self: AdmissionControl, request: Any) -> Any:
        seen.append(await eventually(lambda: flights(redis_db), timeout_s=5))
        if then is not None:
            raise then
        return await admit(self, request)

    monkeypatch.setattr(AdmissionControl, "admit", after_the_claim)
    return seen


@pytest.fixture
async def knows_acme(orchestrator: Served, test_keys: ApiKeys, redis_db: redis.Redis) -> Served:
    """The orchestrator after one request, so it knows acme's key (and looks up beside
    admissions); that request's lock is gone once its answer is stored."""
    await generate(orchestrator, test_keys.acme, marked(uuid.uuid4().hex, cache_policy=None))
    await eventually(lambda: not flights(redis_db))
    return orchestrator


async def test_a_miss_claims_its_single_flight_beside_the_admission(
    knows_acme: Served,
    test_keys: ApiKeys,
    upstream: FakeOpenAI,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orchestrator = knows_acme
    seen = claim_before_admitting(monkeypatch, redis_db)
    marker = uuid.uuid4().hex
    answer = await generate(orchestrator, test_keys.acme, marked(marker, cache_policy=None))
    assert answer.cache_status == common_pb2.CACHE_STATUS_MISS and answer.text
    assert len(seen) == 1 and len(seen[0]) == 1
    assert len(upstream.calls(marker)) == 1
    await eventually(lambda: not flights(redis_db))  # ended once the answer is stored
    monkeypatch.undo()
    again = await generate(orchestrator, test_keys.acme, marked(marker, cache_policy=None))
    assert again.cache_status == common_pb2.CACHE_STATUS_HIT and again.text == answer.text


async def test_a_refused_request_gives_back_the_claim_it_sent_beside_its_admission(
    knows_acme: Served,
    test_keys: ApiKeys,
    upstream: FakeOpenAI,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    orchestrator = knows_acme
    claim_before_admitting(monkeypatch, redis_db, then=CostCeilingExceeded(1, 5))
    marker = uuid.uuid4().hex
    error = await refused(orchestrator, test_keys.acme, marked(marker, cache_policy=None))
    assert error.reason == "COST_CEILING_EXCEEDED"
    # Given back at once, not left to lapse after the lease (10 s): an identical request
    # does not wait on a call that never ran.
    await eventually(lambda: not flights(redis_db), timeout_s=2)
    monkeypatch.undo()
    answer = await generate(orchestrator, test_keys.acme, marked(marker, cache_policy=None))
    assert answer.cache_status == common_pb2.CACHE_STATUS_MISS
    assert len(upstream.calls(marker)) == 1


async def test_a_tenant_refused_lately_sends_no_claim_beside_its_admissions(
    knows_acme: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A tenant refused over and over (past its limits, say) costs Redis no claim and release
    per request that never runs: after a refusal, its requests claim only once admitted."""
    orchestrator = knows_acme
    claims: list[str] = []
    claim = SingleFlight.claim

    def counted(self: SingleFlight, tenant_id: str, exact_key: str) -> Any:
        claims.append(exact_key)
        return claim(self, tenant_id, exact_key)

    async def refused_late(self: AdmissionControl, request: Any) -> Any:
        await asyncio.sleep(0.2)  # the lookup beside it has missed by then
        raise CostCeilingExceeded(1, 5)

    monkeypatch.setattr(SingleFlight, "claim", counted)
    monkeypatch.setattr(AdmissionControl, "admit", refused_late)
    for _ in range(3):
        request = marked(uuid.uuid4().hex, cache_policy=None)
        error = await refused(orchestrator, test_keys.acme, request)
        assert error.reason == "COST_CEILING_EXCEEDED"
    assert len(claims) <= 1  # the first request's at most (given back)
    await eventually(lambda: not flights(redis_db), timeout_s=2)
