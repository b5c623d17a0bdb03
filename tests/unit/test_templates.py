"""Prompt templates: versions, variables, the sandbox and its limits, files and Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
import redis.asyncio
import yaml
from google.protobuf import struct_pb2
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from services.common.errors import DependencyUnavailable, RequestInvalid
from services.common.settings import ConfigError
from services.orchestrator.templates import (
    RenderLimits,
    TemplateNotFound,
    TemplateStore,
    version_key,
)
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2

ROOT = Path(__file__).resolve().parents[2]

SUPPORT: dict[str, Any] = {
    "variables": [
        {"name": "question", "type": "string", "required": True},
        {"name": "tone", "type": "string", "required": False, "default": "friendly"},
        {"name": "documents", "type": "list", "required": False, "default": []},
    ],
    "messages": [
        {"role": "system", "content": "You are a {{ tone }} support agent."},
        {
            "role": "user",
            "content": "{% for d in documents %}[{{ loop.index }}] {{ d.text }}\n"
            "{% endfor %}Question: {{ question }}\n",
        },
    ],
}


def ref(name: str, version: str = "", **variables: Any) -> orchestrator_pb2.TemplateRef:
    template = orchestrator_pb2.TemplateRef(name=name, version=version)
    if variables:
        values = struct_pb2.Struct()
        values.update(variables)
        template.variables.CopyFrom(values)
    return template


def write(directory: Path, name: str, versions: dict[str, Any], file: str = "") -> Path:
    path = directory / (file or f"{name}.yaml")
    path.write_text(yaml.safe_dump({"name": name, "versions": versions}, sort_keys=False))
    return path


def single(content: str, variables: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One version with one user message."""
    return {"variables": variables or [], "messages": [{"role": "user", "content": content}]}


def violated_fields(err: RequestInvalid) -> list[str]:
    return [v.field for v in err.violations]


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    """support@1, @2 and @10 (10 greets differently) from files, no Redis."""
    later = {**SUPPORT, "messages": [{"role": "user", "content": "v10: {{ question }}"}]}
    write(tmp_path, "support", {"1": SUPPORT, "2": SUPPORT, "10": later})
    return TemplateStore(tmp_path)


@pytest.fixture
async def aredis(redis_db: redis.Redis, redis_url: str) -> AsyncIterator[redis.asyncio.Redis]:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


# --- Versions --------------------------------------------------------------------------


def test_versions_order_numerically() -> None:
    versions = ["10", "2", "1.10", "1", "1.2", "1.9", "2.0"]
    assert sorted(versions, key=version_key) == ["1", "1.2", "1.9", "1.10", "2", "2.0", "10"]


async def test_latest_version_is_the_highest(store: TemplateStore) -> None:
    assert store.versions("support") == ["1", "2", "10"]
    rendered = await store.render(ref("support", question="Why?"))
    assert (rendered.name, rendered.version) == ("support", "10")
    assert [m.content for m in rendered.messages] == ["v10: Why?"]


async def test_explicit_version(store: TemplateStore) -> None:
    rendered = await store.render(ref("support", "2", question="Why?"))
    assert rendered.version == "2"
    assert [(m.role, m.content) for m in rendered.messages] == [
        (common_pb2.ROLE_SYSTEM, "You are a friendly support agent."),
        (common_pb2.ROLE_USER, "Question: Why?"),
    ]


@pytest.mark.parametrize(("name", "version"), [("nope", ""), ("support", "3"), ("bad name!", "")])
async def test_unknown_template_or_version_is_not_found(
    store: TemplateStore, name: str, version: str
) -> None:
    with pytest.raises(TemplateNotFound) as caught:
        await store.render(ref(name, version, question="Why?"))
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert caught.value.reason == "TEMPLATE_NOT_FOUND"
    assert caught.value.metadata == {"template": name, "version": version}
    assert store.versions(name) == ([] if name != "support" else ["1", "2", "10"])


async def test_a_name_is_required(store: TemplateStore) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await store.render(ref(""))
    assert violated_fields(caught.value) == ["template.name"]


# --- Variables ------------------------------------------------------------------------


async def test_missing_required_variable_is_named(store: TemplateStore) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await store.render(ref("support", "1", tone="curt"))
    assert caught.value.reason == "REQUEST_INVALID"
    assert violated_fields(caught.value) == ["template.variables.question"]
    assert "required" in caught.value.violations[0].description


async def test_undeclared_variable_is_named(store: TemplateStore) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await store.render(ref("support", "1", question="Why?", mood="grumpy"))
    assert violated_fields(caught.value) == ["template.variables.mood"]


@pytest.mark.parametrize(
    ("kind", "value", "expected"),
    [
        ("string", "hi", "hi"),
        ("integer", 3, "3"),  # a Struct carries 3.0: an integral number is an integer
        ("number", 2.5, "2.5"),
        ("number", 2, "2"),  # whole numbers from a Struct print without ".0"
        ("boolean", True, "True"),
        ("list", ["a", 1], "['a', 1]"),
        ("object", {"k": "v"}, "{'k': 'v'}"),
    ],
)
async def test_each_type_accepts_its_values(
    tmp_path: Path, kind: str, value: Any, expected: str
) -> None:
    write(tmp_path, "t", {"1": single("{{ v }}", [{"name": "v", "type": kind}])})
    rendered = await TemplateStore(tmp_path).render(ref("t", v=value))
    assert rendered.messages[0].content == expected


@pytest.mark.parametrize(
    ("kind", "value", "why"),
    [
        ("string", 3, "must be a string, not a number"),
        ("integer", 2.5, "must be an integer, not 2.5"),
        ("integer", "3", "must be an integer, not a string"),
        ("integer", True, "must be an integer, not a boolean"),
        ("number", "1", "must be a number, not a string"),
        ("boolean", "yes", "must be a boolean, not a string"),
        ("list", {"a": 1}, "must be a list, not an object"),
        ("object", [1], "must be an object, not a list"),
    ],
)
async def test_wrong_type_is_named(tmp_path: Path, kind: str, value: Any, why: str) -> None:
    write(tmp_path, "t", {"1": single("{{ v }}", [{"name": "v", "type": kind}])})
    with pytest.raises(RequestInvalid) as caught:
        await TemplateStore(tmp_path).render(ref("t", v=value))
    assert violated_fields(caught.value) == ["template.variables.v"]
    assert caught.value.violations[0].description == why


async def test_every_problem_is_reported_at_once(store: TemplateStore) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await store.render(ref("support", "1", tone=1, extra="x"))
    assert sorted(violated_fields(caught.value)) == [
        "template.variables.extra",
        "template.variables.question",
        "template.variables.tone",
    ]


async def test_defaults_apply_and_optional_without_default_is_null(tmp_path: Path) -> None:
    variables: list[dict[str, Any]] = [
        {"name": "tone", "type": "string", "default": "friendly"},
        {"name": "limit", "type": "integer", "default": 3},
        {"name": "note", "type": "string", "required": False},
    ]
    content = "{{ tone }} {{ limit }} [{{ note }}]{% if not note %} no note{% endif %}"
    write(tmp_path, "t", {"1": single(content, variables)})
    rendered = await TemplateStore(tmp_path).render(ref("t"))
    assert rendered.messages[0].content == "friendly 3 [] no note"


async def test_documents_loop(store: TemplateStore) -> None:
    documents = [
        {"text": "Reset with the red button.", "document_id": "d1", "version": "3", "chunk": 0},
        {"text": "Hold it 5 s.", "document_id": "d2", "version": "1", "chunk": 4, "score": 0.8},
    ]
    rendered = await store.render(ref("support", "1", question="Reset?"), {"documents": documents})
    assert rendered.messages[1].content == (
        "[1] Reset with the red button.\n[2] Hold it 5 s.\nQuestion: Reset?"
    )


async def test_extra_fills_only_declared_variables_the_request_left_unset(
    store: TemplateStore,
) -> None:
    extra = {"documents": [{"text": "retrieved"}], "unrelated": object()}
    rendered = await store.render(ref("support", "1", question="Q"), extra)
    assert "[1] retrieved" in rendered.messages[1].content
    given = ref("support", "1", question="Q", documents=[{"text": "given"}])
    rendered = await store.render(given, extra)
    assert "[1] given" in rendered.messages[1].content


async def test_prompt_hash_is_stable_and_follows_the_variables(
    store: TemplateStore, tmp_path: Path
) -> None:
    first = await store.render(ref("support", "1", question="Why?"))
    again = await TemplateStore(tmp_path).render(ref("support", "1", question="Why?"))
    other = await store.render(ref("support", "1", question="Why not?"))
    assert len(first.prompt_hash) == 64
    assert first.prompt_hash == again.prompt_hash
    assert other.prompt_hash != first.prompt_hash
    # The same text under another version still hashes the same: it is the prompt's hash.
    assert (await store.render(ref("support", "2", question="Why?"))).prompt_hash == (
        first.prompt_hash
    )


async def test_an_empty_user_message_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "t", {"1": single("{% if false %}x{% endif %}")})
    with pytest.raises(RequestInvalid) as caught:
        await TemplateStore(tmp_path).render(ref("t"))
    assert caught.value.reason == "TEMPLATE_INVALID"
    assert "t@1" in caught.value.message


async def test_a_rendering_error_names_the_template(store: TemplateStore) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await store.render(ref("support", "1", question="Q"), {"documents": [{"title": "no text"}]})
    assert caught.value.reason == "TEMPLATE_INVALID"
    assert violated_fields(caught.value) == ["template"]
    assert "support@1" in caught.value.message and "text" in caught.value.message


# --- The sandbox ----------------------------------------------------------------------

ESCAPES = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ question.__class__.__base__.__subclasses__() }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__init__.__globals__ }}",
    "{{ range.__globals__ }}",
    "{{ range.__self__ }}",
    "{{ question|attr('__class__') }}",
    "{{ '{0.__class__.__init__.__globals__}'.format(question) }}",
    "{{ question.format.__globals__ }}",
    "{{ question.encode() }}",
    "{{ (documents|first).text.__len__() }}",
    "{{ documents.append('x') }}",
    "{{ (documents|first).update(text='changed') }}",
    "{{ (documents|first).pop('text') }}",
]


@pytest.mark.parametrize("source", ESCAPES)
async def test_sandbox_escapes_are_refused(tmp_path: Path, source: str) -> None:
    variables = [{"name": "question", "type": "string"}, {"name": "documents", "type": "list"}]
    write(tmp_path, "t", {"1": single(source, variables)})
    documents = [{"text": "original"}]
    with pytest.raises(RequestInvalid) as caught:
        await TemplateStore(tmp_path).render(ref("t", question="q"), {"documents": documents})
    assert caught.value.reason == "TEMPLATE_INVALID"
    assert "was refused" in caught.value.message
    assert documents == [{"text": "original"}]  # nothing the template tried ran


REMOVED_GLOBALS_AND_TAGS = [
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__ }}",
    "{{ joiner() }}",
    "{{ namespace(a=1) }}",
    "{{ dict(a=1) }}",
    "{{ config }}",
    "{{ loop }}",
    "{{ [1, 2]|random }}",
    "{% include 'other' %}",
    "{% import 'other' as o %}",
    "{% extends 'base' %}",
]


@pytest.mark.parametrize("source", REMOVED_GLOBALS_AND_TAGS)
async def test_removed_globals_and_tags_are_refused_before_anything_runs(
    tmp_path: Path, aredis: redis.asyncio.Redis, source: str
) -> None:
    with pytest.raises(RequestInvalid) as caught:
        await TemplateStore(None, aredis).put("t", "1", single(source))
    assert caught.value.reason == "TEMPLATE_INVALID"
    assert violated_fields(caught.value) == ["spec"]
    assert await aredis.exists("strata:templates:t") == 0
    path = write(tmp_path, "t", {"1": single(source)})
    with pytest.raises(ConfigError, match=str(path)):
        TemplateStore(tmp_path)


RESOURCE_BOMBS = [
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ range(10**30)|length }}",
    "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}",
    "{{ 'x' * 10**9 }}",
    "{{ ['x'] * 10**9 }}",
    "{{ 2 ** 1000000 }}",
    "{{ (2 ** 4000) * (2 ** 4000) }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ ('x\\n' * 5000)|indent(10000) }}",
    "{{ '%999999999s'|format('x') }}",
    "{{ '%*s' % (10**9, 'x') }}",
    "{{ '{:>999999999}'.format('x') }}",
    "{{ '{:>{w}}'.format('x', w=10**9) }}",
    "{{ range(10000)|join('x' * 10000) }}",
    "{{ ('a' * 10000)|replace('a', 'b' * 10000) }}",
    "{{ ('a' * 10000).replace('a', 'b' * 10000) }}",
    "{{ ('a ' * 5000)|wordwrap(1, wrapstring='x' * 10000) }}",
    "{{ range(10)|batch(10000, 'x' * 10000)|list }}",
    "{{ range(1000)|list|tojson(10000) }}",
    "{{ [[1]] * 10000|sum(start=[]) }}",
    "{% macro f(s, n) %}{{ f(s ~ s, n - 1) if n else s|length }}{% endmacro %}{{ f('x', 64) }}",
    "{% macro f(l, n) %}{{ f(l + l, n - 1) if n else l|length }}{% endmacro %}{{ f([1], 64) }}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(40) }}",
    "{% set a = ['x' * 1000] * 1000 %}{% set b = [a, a, a, a, a, a, a, a, a, a] %}"
    "{% set c = [b, b, b, b, b, b, b, b, b, b] %}{% set d = [c, c, c, c, c, c, c, c, c, c] %}"
    "{{ d|length }}",
    "{% set b %}{% for i in range(10000) %}"
    + "y" * 1000
    + "{% endfor %}{% endset %}{{ b|length }}",
    "{% for i in range(10000) %}{{ 'x' * 200 }}{% endfor %}",  # 2 MB of output
]


@pytest.mark.parametrize("source", RESOURCE_BOMBS)
async def test_resource_bombs_are_refused_quickly(tmp_path: Path, source: str) -> None:
    write(tmp_path, "t", {"1": single(source)})
    store = TemplateStore(tmp_path)
    started = time.monotonic()
    with pytest.raises(RequestInvalid) as caught:
        await store.render(ref("t"))
    assert time.monotonic() - started < 5
    assert caught.value.reason == "TEMPLATE_INVALID"
    assert "was refused" in caught.value.message


async def test_output_cap_counts_bytes_and_allows_what_fits(tmp_path: Path) -> None:
    write(
        tmp_path,
        "big",
        {
            "1": single(
                "{% for i in range(9000) %}{{ line }}{% endfor %}",
                [{"name": "line", "type": "string"}],
            )
        },
    )
    write(tmp_path, "accents", {"1": single("{{ 'é' * 7 }}")})
    store = TemplateStore(tmp_path)
    rendered = await store.render(ref("big", line="x" * 100))
    assert len(rendered.messages[0].content) == 900_000
    with pytest.raises(RequestInvalid, match="more than 1000000 bytes"):
        await store.render(ref("big", line="x" * 112))
    small = TemplateStore(tmp_path, limits=RenderLimits(output_bytes=13))
    with pytest.raises(RequestInvalid, match="more than 13 bytes"):
        await small.render(ref("accents"))
    assert (
        await TemplateStore(tmp_path, limits=RenderLimits(output_bytes=14)).render(ref("accents"))
    ).messages[0].content == "é" * 7


async def test_ordinary_template_features_still_work(tmp_path: Path) -> None:
    content = (
        "{% macro item(d) %}- {{ d.title|upper }} ({{ '%.1f'|format(d.score) }}){% endmacro %}"
        "{% for d in docs|sort(attribute='score', reverse=true) %}{{ item(d) }}\n{% endfor %}"
        "{{ docs|map(attribute='title')|join(', ') }} | {{ 'a-b'.replace('-', '+') }}"
        " | {{ ('x' ~ n)|center(7) }} | {{ [1, 2] + [3] }} | {{ '{:>4}'.format(n) }}"
        " | {{ docs|length * 2 }} | {{ (docs|first).get('missing', 'none') }}"
        " | {% for k, v in {'a': 1}|dictsort %}{{ k }}={{ v }}{% endfor %}"
        " | {{ range(3)|list }} | {{ docs[0]|tojson }}"
    )
    variables = [{"name": "docs", "type": "list"}, {"name": "n", "type": "integer"}]
    write(tmp_path, "t", {"1": single(content, variables)})
    docs = [{"title": "low", "score": 0.25}, {"title": "high", "score": 0.9}]
    rendered = await TemplateStore(tmp_path).render(ref("t", docs=docs, n=7))
    assert rendered.messages[0].content == (
        "- HIGH (0.9)\n- LOW (0.2)\nlow, high | a+b |    x7   | [1, 2, 3] |    7 | 4 | none"
        ' | a=1 | [0, 1, 2] | {"score": 0.25, "title": "low"}'
    )


# --- Files ----------------------------------------------------------------------------

VALID = {
    "variables": [{"name": "q", "type": "string"}],
    "messages": [{"role": "user", "content": "{{ q }}"}],
}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("name: t\nversions: [unclosed\n", "cannot read template file"),
        ("- just\n- a list\n", "expected a mapping"),
        (
            "name: t\nversions:\n  1.10:\n    messages: [{role: user, content: x}]\n",
            "quoted string",
        ),
        (
            'name: t\nversions:\n  "1": {messages: [{role: user, content: x}]}\n'
            '  "1": {messages: [{role: user, content: y}]}\n',
            "given twice",
        ),
        ('name: t\nversions:\n  "1": {messages: []}\n', "messages"),
        ('name: t\nversions:\n  "1": {messages: [{role: tool, content: x}]}\n', "role"),
        ('name: t\nversions:\n  "1": {messages: [{role: user, content: x}], extra: 1}\n', "extra"),
        ("name: 'bad name'\nversions:\n  \"1\": {messages: [{role: user, content: x}]}\n", "name"),
    ],
)
def test_invalid_files_name_the_file_and_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        TemplateStore(tmp_path)
    assert str(path) in str(caught.value)
    assert problem in str(caught.value)


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ({**VALID, "variables": [{"name": "q", "type": "text"}]}, "variables.0.type"),
        (
            single("{{ q }} {{ nope }}", [{"name": "q", "type": "string"}]),
            "undeclared variables: nope",
        ),
        (single("{% for x in %}"), "line 1"),
        (single("{{ 'x'|no_such_filter }}"), "no_such_filter"),
        (
            single("{{ x }}", [{"name": "x", "type": "string", "required": True, "default": "a"}]),
            "no default",
        ),
        (
            single("{{ x }}", [{"name": "x", "type": "integer", "default": "a"}]),
            "must be an integer",
        ),
        (
            single("{{ x }}", [{"name": "x", "type": "string"}, {"name": "x", "type": "string"}]),
            "twice",
        ),
        (single("{{ range }}", [{"name": "range", "type": "string"}]), "not a valid variable name"),
    ],
)
def test_invalid_versions_name_the_file_and_the_problem(
    tmp_path: Path, version: dict[str, Any], problem: str
) -> None:
    path = write(tmp_path, "t", {"1": VALID, "2": version})
    with pytest.raises(ConfigError) as caught:
        TemplateStore(tmp_path)
    assert str(path) in str(caught.value)
    assert "t@2" in str(caught.value) or "versions.2" in str(caught.value)
    assert problem in str(caught.value)


def test_a_name_defined_twice_names_both_files(tmp_path: Path) -> None:
    first = write(tmp_path, "t", {"1": VALID}, file="a.yaml")
    second = write(tmp_path, "t", {"2": VALID}, file="b.yml")
    with pytest.raises(ConfigError) as caught:
        TemplateStore(tmp_path)
    assert str(first) in str(caught.value) and str(second) in str(caught.value)


def test_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        TemplateStore(tmp_path / "nowhere")


async def test_the_shipped_templates_load_and_render() -> None:
    store = TemplateStore(ROOT / "config" / "templates")
    assert store.versions("support_answer") == ["1", "2"]
    documents = [{"text": " Press reset. ", "document_id": "d1", "version": "1", "chunk": 0}]
    answer = await store.render(
        ref("support_answer", question="How?", product="Acme"), {"documents": documents}
    )
    assert answer.version == "2"
    assert answer.messages[1].content == "[1] (d1) Press reset.\nQuestion: How?"
    summary = await store.render(ref("summarize", text="Long text.", bullet_points=True))
    assert "at most 120 words, as a list of bullet points." in summary.messages[1].content


# --- Redis ----------------------------------------------------------------------------


async def test_put_overrides_a_file_version_and_adds_versions(
    store: TemplateStore, tmp_path: Path, aredis: redis.asyncio.Redis
) -> None:
    with_redis = TemplateStore(tmp_path, aredis)
    await with_redis.put(
        "support", "2", single("redis v2: {{ q }}", [{"name": "q", "type": "string"}])
    )
    rendered = await with_redis.render(ref("support", "2", q="Q"))
    assert rendered.messages[0].content == "redis v2: Q"
    assert (await with_redis.render(ref("support", question="Q"))).version == "10"

    await with_redis.put("support", "11", single("redis v11"))
    await with_redis.put("brand-new", "1", single("new"))
    assert with_redis.versions("support") == ["1", "2", "10", "11"]

    # Another process, which has never seen these versions, reads them from Redis.
    other = TemplateStore(tmp_path, aredis)
    latest = await other.render(ref("support"))
    assert (latest.version, latest.messages[0].content) == ("11", "redis v11")
    assert (await other.render(ref("brand-new"))).messages[0].content == "new"
    assert other.versions("support") == ["1", "2", "10", "11"]
    # The store without Redis still serves the files.
    assert (await store.render(ref("support", "2", question="Q"))).messages[1].content == (
        "Question: Q"
    )
    stored = await aredis.hgetall("strata:templates:support")
    assert set(stored) == {b"2", b"11"}


async def test_an_update_in_redis_is_seen_by_the_next_render(
    tmp_path: Path, aredis: redis.asyncio.Redis
) -> None:
    writer, reader = TemplateStore(None, aredis), TemplateStore(None, aredis)
    await writer.put("t", "1", single("first"))
    assert (await reader.render(ref("t"))).messages[0].content == "first"
    await writer.put("t", "1", single("second"))
    assert (await reader.render(ref("t", "1"))).messages[0].content == "second"


async def test_renders_do_not_recompile(
    aredis: redis.asyncio.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiled: list[str] = []
    original = TemplateStore._compile

    def counting(self: TemplateStore, name: str, version: str, spec: Any) -> Any:
        compiled.append(f"{name}@{version}")
        return original(self, name, version, spec)

    monkeypatch.setattr(TemplateStore, "_compile", counting)
    writer, reader = TemplateStore(None, aredis), TemplateStore(None, aredis)
    await writer.put("t", "1", single("x"))
    for _ in range(3):
        await writer.render(ref("t"))
        await reader.render(ref("t", "1"))
    assert compiled == ["t@1", "t@1"]  # the writer's put, the reader's first render
    await writer.put("t", "1", single("y"))
    await reader.render(ref("t", "1"))
    assert compiled == ["t@1"] * 4


async def test_put_validates_like_files(aredis: redis.asyncio.Redis) -> None:
    store = TemplateStore(None, aredis)
    with pytest.raises(RequestInvalid) as caught:
        await store.put("t", "1", single("{{ undeclared }}"))
    assert caught.value.reason == "TEMPLATE_INVALID"
    assert "undeclared variables: undeclared" in caught.value.message
    with pytest.raises(RequestInvalid) as caught:
        await store.put("t", "1", {"variables": [{"name": "x", "type": "date"}], "messages": []})
    assert "variables.0.type" in caught.value.message
    with pytest.raises(RequestInvalid) as caught:
        await store.put("bad name", "1.x!", single("ok"))
    assert violated_fields(caught.value) == ["name", "version"]
    assert await aredis.keys("strata:templates:*") == []


async def test_a_corrupt_redis_version_is_template_invalid(aredis: redis.asyncio.Redis) -> None:
    await aredis.hset("strata:templates:t", "1", "{not json")
    with pytest.raises(RequestInvalid) as caught:
        await TemplateStore(None, aredis).render(ref("t"))
    assert caught.value.reason == "TEMPLATE_INVALID"
    assert "t@1" in caught.value.message


async def test_redis_down_is_unavailable(tmp_path: Path) -> None:
    write(tmp_path, "t", {"1": VALID})
    down = redis.asyncio.Redis(
        port=1, socket_connect_timeout=0.2, socket_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    try:
        with pytest.raises(DependencyUnavailable) as caught:
            await TemplateStore(tmp_path, down).render(ref("t", q="x"))
    finally:
        await down.aclose()
    assert caught.value.reason == "REDIS_UNAVAILABLE"
