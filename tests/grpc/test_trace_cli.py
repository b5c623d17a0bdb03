"""`strata trace ID` and `strata replay ID` against a running orchestrator."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis

from services.orchestrator.records import record_key
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, traces_pb2
from strata_cli.__main__ import main
from tests.conftest import ApiKeys
from tests.grpc.conftest import Served, StartOrchestrator
from tests.helpers import bearer, eventually, user

BYPASS = common_pb2.CACHE_STATUS_BYPASS


async def strata(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


def a_request(text: str = "how do traces work?") -> orchestrator_pb2.GenerateRequest:
    return orchestrator_pb2.GenerateRequest(
        model="mock-fast",
        messages=[user(text)],
        request_id="original-1",
        params=common_pb2.GenerationParams(seed=5, max_output_tokens=64),
    )


def seed_record(
    client: redis.Redis, request: orchestrator_pb2.GenerateRequest, output: str = ""
) -> traces_pb2.RequestRecord:
    """A record as the orchestrator would keep it, written straight into Redis."""
    record = traces_pb2.RequestRecord(
        request_id=request.request_id,
        tenant_id="acme",
        trace_id="0af7651916cd43dd8448eb211c80319c",
        model=request.model,
        prompt=orchestrator_pb2.PromptInfo(prompt_hash="cd" * 32),
        request=request,
        cache_status=common_pb2.CACHE_STATUS_MISS,
        sources=[orchestrator_pb2.Citation(document_id="faq", version="v1", chunk=2, score=0.8)],
        attempts=[
            traces_pb2.AttemptRecord(model="mock-down", outcome="PROVIDER_UNAVAILABLE"),
            traces_pb2.AttemptRecord(
                model=request.model,
                outcome="OK",
                usage=common_pb2.Usage(input_tokens=6, output_tokens=9),
            ),
        ],
        outcome="OK",
        finish_reason=common_pb2.FINISH_REASON_STOP,
        output=output,
        usage=common_pb2.Usage(input_tokens=6, output_tokens=9),
        cost=common_pb2.Cost(total_usd_micros=12),
        stages=[traces_pb2.StageTiming(stage="admission"), traces_pb2.StageTiming(stage="model")],
    )
    record.create_time.FromSeconds(1_700_000_000)
    record.attempts[0].latency.FromMilliseconds(3)
    record.attempts[1].latency.FromMilliseconds(40)
    record.attempts[1].time_to_first_token.FromMilliseconds(7)
    record.stages[0].duration.FromMilliseconds(2)
    record.stages[1].duration.FromMilliseconds(45)
    record.latency.FromMilliseconds(51)
    client.set(record_key("acme", request.request_id), record.SerializeToString())
    return record


async def test_trace_prints_the_record(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_record(redis_db, a_request(), output="Mock answer:\nhow do traces work?")
    common = ["--address", orchestrator.address, "--key", test_keys.acme]

    assert await strata("trace", "original-1", *common) == 0

    out = capsys.readouterr().out
    for expected in (
        "original-1",
        "acme",
        "0af7651916cd43dd8448eb211c80319c",
        "mock-fast",
        "sha256 " + "cd" * 32,
        "cache     MISS",
        "faq@v1 chunk 2",
        "1. mock-down PROVIDER_UNAVAILABLE 3 ms",
        "2. mock-fast OK 40 ms · first token 7 ms · 6 in / 9 out tokens",
        "finish    stop",
        "$0.000012",
        "admission 2 ms · model 45 ms",
        "latency   51 ms",
        "  how do traces work?",
    ):
        assert expected in out

    assert await strata("trace", "original-1", "--json", *common) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["request_id"] == "original-1"
    assert printed["request"]["params"]["seed"] == "5"


async def test_trace_of_another_tenants_or_an_unknown_request_fails(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_record(redis_db, a_request())

    for key, request_id in ((test_keys.globex, "original-1"), (test_keys.acme, "nope")):
        code = await strata("trace", request_id, "--address", orchestrator.address, "--key", key)
        assert code == 1
        assert "NOT_FOUND TRACE_NOT_FOUND" in capsys.readouterr().err


async def test_trace_and_replay_need_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STRATA_API_KEY", raising=False)
    assert await strata("trace", "any") == 2
    assert await strata("replay", "any") == 2


async def test_replay_runs_the_request_again_past_the_cache(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    request = a_request()
    # What the model answered the first time (the mock: same prompt and seed, same text).
    first = await orchestrator.stub.Generate(request, metadata=bearer(test_keys.acme), timeout=10)
    # Its own record is written after the reply: let it land before the seeded one.
    await eventually(lambda: redis_db.exists(record_key("acme", request.request_id)))
    seed_record(redis_db, request, output=first.text)
    common = ["--address", orchestrator.address, "--key", test_keys.acme]

    assert await strata("replay", "original-1", "--json", *common) == 0

    compared = json.loads(capsys.readouterr().out)
    replay = compared["replay"]
    assert replay["request_id"] not in ("", "original-1")
    assert replay["model"] == "mock-fast"
    assert replay["cache_status"] == "CACHE_STATUS_BYPASS"
    assert replay["output"] == first.text
    assert compared["same_output"] is True
    assert compared["diff"] == ""
    assert compared["original"]["latency_ms"] == 51

    assert await strata("replay", "original-1", *common) == 0
    out = capsys.readouterr().out
    assert "The output is the same." in out
    assert "latency   51 ms" in out


async def test_replay_shows_the_difference(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_record(redis_db, a_request(), output="An answer from another day.\n")

    code = await strata(
        "replay", "original-1", "--address", orchestrator.address, "--key", test_keys.acme
    )

    assert code == 0
    out = capsys.readouterr().out
    assert "--- original original-1" in out
    assert "-An answer from another day." in out
    assert "\n+Mock answer to" in out


async def test_replay_without_captured_output_prints_the_new_answer(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seed_record(redis_db, a_request())

    code = await strata(
        "replay", "original-1", "--address", orchestrator.address, "--key", test_keys.acme
    )

    assert code == 0
    out = capsys.readouterr().out
    assert "The original output was not captured" in out
    assert "how do traces work" in out.lower()


async def test_trace_and_replay_of_a_real_request(
    orchestrator: Served,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    first = await orchestrator.stub.Generate(
        a_request(), metadata=bearer(test_keys.acme), timeout=10
    )
    # Records are saved after the reply.
    await eventually(lambda: redis_db.exists(record_key("acme", "original-1")))
    common = ["--address", orchestrator.address, "--key", test_keys.acme]

    assert await strata("trace", "original-1", *common) == 0
    out = capsys.readouterr().out
    assert "request   original-1" in out
    assert "output    (not captured)" in out

    assert await strata("replay", "original-1", "--json", *common) == 0
    compared = json.loads(capsys.readouterr().out)
    # Not captured, so nothing to diff; the same prompt and seed give the mock's same text.
    assert compared["same_output"] is None
    assert compared["replay"]["output"] == first.text
    assert compared["replay"]["prompt_hash"] == compared["original"]["prompt_hash"]

    # The replay's own record: the same seed, and the cache neither read nor written.
    replay_id = compared["replay"]["request_id"]
    await eventually(lambda: redis_db.exists(record_key("acme", replay_id)))
    assert await strata("trace", replay_id, "--json", *common) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["cache_status"] == common_pb2.CacheStatus.Name(BYPASS)
    assert replayed["request"]["params"]["seed"] == "5"
    assert replayed["request"]["cache_policy"]["mode"] == "CACHE_MODE_BYPASS"


async def test_replay_of_a_captured_request_diffs_nothing(
    start_orchestrator: StartOrchestrator,
    test_keys: ApiKeys,
    redis_db: redis.Redis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = await start_orchestrator(capture_content=True)
    first = await served.stub.Generate(a_request(), metadata=bearer(test_keys.acme), timeout=10)
    # The record is saved after the reply.
    await eventually(lambda: redis_db.exists(record_key("acme", "original-1")))
    common = ["--address", served.address, "--key", test_keys.acme]

    assert await strata("trace", "original-1", *common) == 0
    assert first.text.splitlines()[0] in capsys.readouterr().out

    assert await strata("replay", "original-1", "--json", *common) == 0
    compared = json.loads(capsys.readouterr().out)
    assert compared["same_output"] is True
    assert compared["diff"] == ""
    assert compared["replay"]["output"] == first.text
