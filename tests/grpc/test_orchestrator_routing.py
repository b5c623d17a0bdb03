"""Routes and prompt templates through the public API, on the in-process test services.

Route requests name `route` instead of `model`; `GenerateResponse.model` says which
candidate answered and `prompt` which route and template built the conversation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import yaml
from google.protobuf import struct_pb2

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2
from tests.conftest import ApiKeys
from tests.fakes.openai_upstream import FakeOpenAI
from tests.grpc.conftest import Served, StartOrchestrator
from tests.helpers import RichError, bearer, eventually, rich_error, state_snapshot, user

ROUTES: dict[str, dict[str, Any]] = {
    "fallback": {"policy": "fallback", "candidates": ["mock-error", "mock-fast"]},
    "started-then-cut": {"policy": "fallback", "candidates": ["mock-cut", "mock-fast"]},
    "weighted": {
        "policy": "weighted",
        "candidates": ["mock-fast", "mock-dear-prompt"],
        "weights": {"mock-fast": 3, "mock-dear-prompt": 1},
    },
    # Listed dearest-for-short-prompts first, so the order is the policy's, not the file's.
    "cheapest": {"policy": "cheapest", "candidates": ["mock-dear-answer", "mock-dear-prompt"]},
    "fastest": {"policy": "fastest", "candidates": ["mock-small", "mock-fast"]},
    "fastest-reversed": {"policy": "fastest", "candidates": ["mock-fast", "mock-small"]},
    "rules": {
        "policy": "rules",
        "candidates": ["mock-dear-prompt", "mock-fast"],
        "rules": [
            {"when": {"prompt_tokens_over": 200}, "candidates": ["mock-dear-answer"]},
            {"when": {"tags": {"tier": "free"}}, "candidates": ["mock-fast"]},
        ],
    },
    "hanging": {"candidates": ["mock-hang"], "latency_budget_s": 0.5},
    "capped": {"candidates": ["up-ok", "mock-fast"], "max_cost_usd": "0.005"},
    "uncapped": {"candidates": ["up-ok", "mock-fast"]},
    "too-dear": {"candidates": ["up-ok"], "max_cost_usd": "0.001"},
}
"""up-ok may cost about 0.02 USD (2048 output tokens at 10 USD per million), mock-fast about
0.0012; mock-dear-prompt is the cheaper of the two dear models below about 1000 prompt
tokens, mock-dear-answer above."""

LONG = "word " * 4000
"""About 5000 prompt tokens."""


def write_routes(path: Path, routes: dict[str, dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump({"routes": routes}))
    return path


@pytest.fixture
async def routed(start_orchestrator: StartOrchestrator, tmp_path: Path) -> Served:
    """An orchestrator serving ROUTES and the templates of config/templates."""
    return await start_orchestrator(
        routes_file=write_routes(tmp_path / "routes.yaml", ROUTES), knowledge_enabled=False
    )


def question(text: str = "") -> str:
    """A prompt no other request of the session sends (so the cache cannot answer it)."""
    return f"{text} {uuid.uuid4().hex}".strip()


def via_route(route: str, text: str | None = None, **fields: Any) -> Any:
    return orchestrator_pb2.GenerateRequest(
        route=route, messages=[user(text if text is not None else question())], **fields
    )


async def generate(served: Served, key: str, request: Any, timeout: float = 10) -> Any:
    return await served.stub.Generate(request, metadata=bearer(key), timeout=timeout)


async def refused(served: Served, key: str, request: Any, timeout: float = 10) -> RichError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(served, key, request, timeout)
    return rich_error(caught.value)


# --- Policies --------------------------------------------------------------------------


async def test_fallback_route_answers_with_the_next_candidate(
    routed: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    reply = await generate(routed, test_keys.acme, via_route("fallback"))
    assert reply.model == "mock-fast"
    assert reply.text.startswith("Mock answer")
    assert reply.prompt.route == "fallback"
    # The first candidate was tried: its failure reached its breaker (settled after the reply).
    await eventually(lambda: redis_db.hget("strata:{m:mock-error}:breaker", "consecutive"))
    assert redis_db.hget("strata:{m:mock-error}:breaker", "consecutive") == b"1"

    chunks = [
        c
        async for c in routed.stub.StreamGenerate(
            orchestrator_pb2.StreamGenerateRequest(route="fallback", messages=[user(question())]),
            metadata=bearer(test_keys.acme),
            timeout=10,
        )
    ]
    assert chunks[0].start.model == "mock-fast"
    assert chunks[-1].final.finish_reason == common_pb2.FINISH_REASON_STOP


async def test_a_failure_after_the_answer_started_ends_the_stream(
    routed: Served, test_keys: ApiKeys
) -> None:
    chunks = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in routed.stub.StreamGenerate(
            orchestrator_pb2.StreamGenerateRequest(
                route="started-then-cut", messages=[user(question())]
            ),
            metadata=bearer(test_keys.acme),
            timeout=10,
        ):
            chunks.append(chunk)
    assert rich_error(caught.value).reason == "STREAM_INTERRUPTED"
    # No second answer was spliced onto the first one's words.
    assert {c.start.model for c in chunks if c.HasField("start")} == {"mock-cut"}


async def test_weighted_route_draws_the_first_candidate_by_weight(
    routed: Served, test_keys: ApiKeys
) -> None:
    replies = await asyncio.gather(
        *(generate(routed, test_keys.acme, via_route("weighted")) for _ in range(100))
    )
    used = Counter(r.model for r in replies)
    assert set(used) == {"mock-fast", "mock-dear-prompt"}
    # 3:1 over 100 draws: 25 expected, standard deviation about 4.3.
    assert 10 <= used["mock-dear-prompt"] <= 42, used


async def test_cheapest_route_prices_the_prompt_and_the_longest_answer(
    routed: Served, test_keys: ApiKeys
) -> None:
    short = await generate(routed, test_keys.acme, via_route("cheapest", question("short")))
    assert short.model == "mock-dear-prompt"
    long = await generate(routed, test_keys.acme, via_route("cheapest", question(LONG)))
    assert long.model == "mock-dear-answer"


async def test_fastest_route_measures_each_model_then_prefers_the_fastest(
    routed: Served, test_keys: ApiKeys
) -> None:
    params = common_pb2.GenerationParams(max_output_tokens=6)  # mock-small: 40 ms a word
    chosen = []
    for _ in range(5):
        reply = await generate(routed, test_keys.acme, via_route("fastest", params=params))
        chosen.append(reply.model)
    # Each unmeasured model is tried once, in the configured order; then the faster one.
    assert chosen == ["mock-small", "mock-fast", "mock-fast", "mock-fast", "mock-fast"]
    # Measurements are per model, so another route over the same models agrees at once.
    reply = await generate(routed, test_keys.acme, via_route("fastest-reversed", params=params))
    assert reply.model == "mock-fast"


async def test_rules_route_matches_prompt_size_then_tags(
    routed: Served, test_keys: ApiKeys
) -> None:
    cases = [
        ("short", {}, "mock-dear-prompt"),
        ("short", {"tier": "paid"}, "mock-dear-prompt"),
        ("short", {"tier": "free"}, "mock-fast"),
        ("long", {"tier": "free"}, "mock-dear-answer"),  # the first matching rule wins
    ]
    for size, tags, expected in cases:
        text = question("word " * 200 if size == "long" else "short")
        reply = await generate(routed, test_keys.acme, via_route("rules", text, tags=tags))
        assert reply.model == expected, (size, tags)


async def test_rules_route_sizes_the_rendered_template(routed: Served, test_keys: ApiKeys) -> None:
    # No messages at all: the prompt is the template's, and it is long.
    request = orchestrator_pb2.GenerateRequest(
        route="rules",
        template=orchestrator_pb2.TemplateRef(
            name="support_answer", version="1", variables=variables(question=question(LONG))
        ),
    )
    reply = await generate(routed, test_keys.acme, request)
    assert reply.model == "mock-dear-answer"


async def test_latency_budget_is_the_requests_deadline(routed: Served, test_keys: ApiKeys) -> None:
    began = time.monotonic()
    error = await refused(routed, test_keys.acme, via_route("hanging"), timeout=10)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.45 <= time.monotonic() - began < 2.0


async def test_cost_ceiling_skips_models_that_may_cost_more(
    routed: Served, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    capped = await generate(routed, test_keys.acme, via_route("capped", question(marker)))
    assert capped.model == "mock-fast"
    assert upstream.calls(marker) == []

    # Without a route ceiling the client's applies; with both, the smaller one.
    for route, client_micros in (("uncapped", 5000), ("capped", 1_000_000)):
        reply = await generate(
            routed,
            test_keys.acme,
            via_route(route, question(marker), max_cost_usd_micros=client_micros),
        )
        assert reply.model == "mock-fast", route
    assert upstream.calls(marker) == []
    uncapped = await generate(routed, test_keys.acme, via_route("uncapped", question(marker)))
    assert uncapped.model == "up-ok"


async def test_a_ceiling_no_candidate_fits_refuses_before_any_call(
    routed: Served, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    marker = uuid.uuid4().hex
    error = await refused(routed, test_keys.acme, via_route("too-dear", question(marker)))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "COST_CEILING_EXCEEDED")
    assert error.metadata["ceiling_usd_micros"] == "1000"
    assert int(error.metadata["cheapest_usd_micros"]) > 1000
    assert upstream.calls(marker) == []


async def test_an_unknown_route_is_not_found_and_changes_nothing(
    routed: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    before = state_snapshot(redis_db)
    error = await refused(routed, test_keys.acme, via_route("no-such-route"))
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "ROUTE_NOT_FOUND")
    assert error.metadata == {"route": "no-such-route"}
    both = via_route("fallback", model="mock-fast")
    invalid = await refused(routed, test_keys.acme, both)
    assert (invalid.code, invalid.field_violations) == (grpc.StatusCode.INVALID_ARGUMENT, ["route"])
    assert state_snapshot(redis_db) == before


async def test_routes_reload_when_their_file_changes(
    start_orchestrator: StartOrchestrator,
    test_keys: ApiKeys,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = write_routes(tmp_path / "routes.yaml", {"steady": {"candidates": ["mock-fast"]}})
    served = await start_orchestrator(routes_file=path, knowledge_enabled=False)
    assert (await generate(served, test_keys.acme, via_route("steady"))).model == "mock-fast"
    assert (await refused(served, test_keys.acme, via_route("added"))).reason == "ROUTE_NOT_FOUND"

    # A version that does not validate is logged and the routes in use keep serving.
    with caplog.at_level(logging.ERROR, logger="services.orchestrator.routes"):
        write_routes(
            path,
            {
                "steady": {"candidates": ["no-such-model"]},
                "added": {"candidates": ["mock-fast"]},
            },
        )
        async with asyncio.timeout(5):
            while "keeping the current routes" not in caplog.text:
                await asyncio.sleep(0.05)
    assert (await generate(served, test_keys.acme, via_route("steady"))).model == "mock-fast"
    assert (await refused(served, test_keys.acme, via_route("added"))).reason == "ROUTE_NOT_FOUND"

    write_routes(
        path,
        {"steady": {"candidates": ["mock-dear-prompt"]}, "added": {"candidates": ["mock-fast"]}},
    )
    async with asyncio.timeout(5):
        while True:
            try:
                reply = await generate(served, test_keys.acme, via_route("added"))
                break
            except grpc.aio.AioRpcError as err:
                assert rich_error(err).reason == "ROUTE_NOT_FOUND"
                await asyncio.sleep(0.1)
    assert reply.model == "mock-fast"
    assert (await generate(served, test_keys.acme, via_route("steady"))).model == (
        "mock-dear-prompt"
    )


# --- Templates -------------------------------------------------------------------------


def variables(**values: Any) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def templated(name: str, version: str = "", model: str = "mock-fast", **values: Any) -> Any:
    return orchestrator_pb2.GenerateRequest(
        model=model,
        template=orchestrator_pb2.TemplateRef(
            name=name, version=version, variables=variables(**values)
        ),
    )


async def test_a_template_renders_its_latest_version_unless_one_is_named(
    routed: Served, test_keys: ApiKeys
) -> None:
    asked = question("How do I change my avatar")
    latest = await generate(
        routed, test_keys.acme, templated("support_answer", question=asked, product="Acme")
    )
    assert latest.prompt.template == "support_answer@2"
    # The mock repeats the start of the last user message: the rendered template's.
    assert "Question: How do I change my avatar" in latest.text
    first = await generate(routed, test_keys.acme, templated("support_answer", "1", question=asked))
    assert first.prompt.template == "support_answer@1"
    # Version 2 requires `product`: asking for the latest without it is refused.
    error = await refused(routed, test_keys.acme, templated("support_answer", question=asked))
    assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
    assert error.field_violations == ["template.variables.product"]


async def test_template_variables_are_checked_by_name_and_type(
    routed: Served, test_keys: ApiKeys, redis_db: redis.Redis
) -> None:
    before = state_snapshot(redis_db)
    cases: list[tuple[dict[str, Any], list[str]]] = [
        ({"product": "Acme"}, ["template.variables.question"]),
        ({"question": "why?", "product": 7}, ["template.variables.product"]),
        (
            {"question": "why?", "product": "Acme", "max_sentences": "five"},
            ["template.variables.max_sentences"],
        ),
        (
            {"question": "why?", "product": "Acme", "max_sentences": 2.5},
            ["template.variables.max_sentences"],
        ),
        ({"question": "why?", "product": "Acme", "colour": "red"}, ["template.variables.colour"]),
        ({"question": ["why?"]}, ["template.variables.product", "template.variables.question"]),
    ]
    for values, fields in cases:
        error = await refused(routed, test_keys.acme, templated("support_answer", "2", **values))
        assert (error.code, error.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_INVALID")
        assert sorted(error.field_violations) == fields, values
    assert state_snapshot(redis_db) == before
    # A whole number is an integer, whatever the Struct's doubles say.
    reply = await generate(
        routed,
        test_keys.acme,
        templated("support_answer", "2", question=question("why"), product="Acme", max_sentences=3),
    )
    assert reply.prompt.template == "support_answer@2"


async def test_an_unknown_template_or_version_is_not_found(
    routed: Served, test_keys: ApiKeys
) -> None:
    for name, version in (("no_such_template", ""), ("support_answer", "9")):
        error = await refused(routed, test_keys.acme, templated(name, version, question="why?"))
        assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "TEMPLATE_NOT_FOUND")
        assert error.metadata == {"template": name, "version": version}


async def test_prompt_info_names_the_template_and_hashes_what_the_model_saw(
    routed: Served, test_keys: ApiKeys, upstream: FakeOpenAI
) -> None:
    asked = question("Where is my parcel")

    def ask(tone: str) -> Any:
        request = templated(
            "support_answer", "2", "up-ok", question=asked, product="Acme", tone=tone
        )
        request.route, request.model = "uncapped", ""
        return request

    first = await generate(routed, test_keys.acme, ask("calm"))
    assert (first.prompt.route, first.prompt.template) == ("uncapped", "support_answer@2")
    assert len(first.prompt.prompt_hash) == 64
    [exchange] = upstream.calls(asked)
    sent = exchange.body["messages"]
    assert [m["role"] for m in sent] == ["system", "user"]
    assert sent[0]["content"].startswith("You are a calm support agent for Acme.")

    again = await generate(routed, test_keys.acme, ask("calm"))
    assert again.cache_status == common_pb2.CACHE_STATUS_HIT
    assert again.prompt == first.prompt
    # The tone is only in the system message, which the answer does not echo.
    other = await generate(routed, test_keys.acme, ask("cheerful"))
    assert other.prompt.template == "support_answer@2"
    assert other.prompt.prompt_hash != first.prompt.prompt_hash
    assert len(upstream.calls(asked)) == 2


ESCAPES: dict[str, str] = {
    "mro": "{{ ''.__class__.__mro__ }}",
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "attr-filter": "{{ ''|attr('__class__') }}",
    "format-field": "{{ '{0.__class__}'.format('') }}",
    "range-self": "{{ range.__self__ }}",
    "method-self": "{{ helper.get.__self__ }}",
    "huge-repeat": "{{ 'x' * 10**9 }}",
    "repeat-of-repeat": "{{ ('x' * 10000) * 10000 }}",
    "huge-power": "{{ 2 ** 100000 }}",
    "huge-range": "{% for i in range(10**9) %}x{% endfor %}",
    "huge-width": "{{ '%999999999s' % 'x' }}",
    "nested-loops": (
        "{% for i in range(10000) %}{% for j in range(10000) %}x{% endfor %}{% endfor %}"
    ),
    "macro-bomb": "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% else %}xxxx"
    "{% endif %}{% endmacro %}{{ f(30) }}",
    "join": "{{ ('x' * 10000).join(range(10000)|map('string')) }}",
}
"""Attempts to reach Python's internals or to exhaust the server, by version name."""
REDIS_ESCAPES: dict[str, str] = {
    "cycler": "{{ cycler.__init__.__globals__.os }}",
    "lipsum": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "namespace": "{% set ns = namespace(a=1) %}{{ ns.__init__.__globals__ }}",
}
"""Attempts that name Jinja globals the sandbox removed (a file using them does not load,
so they are planted in Redis, where runtime versions live)."""


async def test_sandbox_escapes_are_refused_and_the_server_keeps_answering(
    start_orchestrator: StartOrchestrator,
    test_keys: ApiKeys,
    tmp_path: Path,
    redis_db: redis.Redis,
) -> None:
    helper = {"name": "helper", "type": "object", "required": False, "default": {}}
    versions = {
        name: {"variables": [helper], "messages": [{"role": "user", "content": f"go {body}"}]}
        for name, body in ESCAPES.items()
    }
    versions["ok"] = {"messages": [{"role": "user", "content": "a harmless {{ 'prompt' }}"}]}
    directory = tmp_path / "templates"
    directory.mkdir()
    (directory / "escapes.yaml").write_text(
        yaml.safe_dump({"name": "escapes", "versions": versions})
    )
    for name, body in REDIS_ESCAPES.items():
        spec = {"messages": [{"role": "user", "content": f"go {body}"}]}
        redis_db.hset("strata:templates:escapes", name, json.dumps(spec))
    served = await start_orchestrator(templates_dir=directory, knowledge_enabled=False)

    began = time.monotonic()
    for version in [*ESCAPES, *REDIS_ESCAPES]:
        error = await refused(served, test_keys.acme, templated("escapes", version))
        assert (error.code, error.reason) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "TEMPLATE_INVALID",
        ), version
        assert error.field_violations == ["template"], version
        assert "<class" not in error.message and "<module" not in error.message, version
    # The limits cut every attempt short instead of letting it run.
    assert time.monotonic() - began < 5

    reply = await generate(served, test_keys.acme, templated("escapes", "ok"))
    assert reply.prompt.template == "escapes@ok"
    assert "a harmless prompt" in reply.text
