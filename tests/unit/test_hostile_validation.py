"""Property tests of the request validators: whatever arrives, a validator accepts it or
raises RequestInvalid (never another exception), and what it accepts is within the bounds."""

from __future__ import annotations

import json
import math
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.cache.scope import check_store
from services.common.catalog import Catalog, load_catalog
from services.common.errors import ModelNotFound, RequestInvalid
from services.common.validation import (
    MAX_JSON_DEPTH,
    MAX_MESSAGES,
    MAX_TOKENS,
    _is_json_object,
    check_generation,
    json_depth,
)
from services.control.admission import _check_admit
from services.orchestrator.preparation import check_shape
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2
from strata.orchestrator.v1 import orchestrator_pb2
from tests.conftest import ROOT

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CATALOG: Catalog = load_catalog(ROOT / "config" / "models.yaml")

# Protobuf strings hold valid Unicode only: surrogates are refused when set (and arrive as
# invalid UTF-8, refused when parsed), so text leaves them out.
text = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)
odd_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 0.0, 1.0, 2.0, 2.0000001]),
)
int32 = st.integers(-(2**31), 2**31 - 1)
int64 = st.integers(-(2**63), 2**63 - 1)
enum_number: st.SearchStrategy[Any] = st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 8)


def nested_json(depth: int) -> str:
    return '{"a":' + "[" * depth + "]" * depth + "}"


json_text = st.one_of(
    text,
    st.integers(0, 200).map(nested_json),
    st.integers(0, 5000).map(lambda n: "[" * n),
    st.recursive(
        st.none() | st.booleans() | st.integers() | text,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=10,
    ).map(json.dumps),
)

tool_call = st.builds(common_pb2.ToolCall, id=text, name=text, arguments_json=json_text)
message = st.builds(
    common_pb2.ChatMessage,
    role=enum_number,
    content=text,
    name=text,
    tool_call_id=text,
    tool_calls=st.lists(tool_call, max_size=2),
)


@st.composite
def generation_params(draw: st.DrawFn) -> common_pb2.GenerationParams:
    made = common_pb2.GenerationParams(
        stop=draw(st.lists(text, max_size=6)),
        tools=draw(
            st.lists(
                st.builds(common_pb2.Tool, name=text, description=text, parameters_json=json_text),
                max_size=3,
            )
        ),
        tool_choice=common_pb2.ToolChoice(mode=draw(enum_number), function_name=draw(text)),
        response_format=common_pb2.ResponseFormat(
            type=draw(enum_number), schema_name=draw(text), json_schema=draw(json_text)
        ),
    )
    if draw(st.booleans()):
        made.temperature = draw(odd_float)
    if draw(st.booleans()):
        made.top_p = draw(odd_float)
    if draw(st.booleans()):
        made.max_output_tokens = draw(int32)
    if draw(st.booleans()):
        made.seed = draw(int64)
    return made


@st.composite
def generate_requests(draw: st.DrawFn) -> orchestrator_pb2.GenerateRequest:
    made = orchestrator_pb2.GenerateRequest(
        model=draw(st.sampled_from(["mock-fast", "mock-small", ""]) | text),
        messages=draw(st.lists(message, max_size=4)),
        params=draw(generation_params()),
        request_id=draw(text),
        priority=draw(enum_number),
        tags=draw(st.dictionaries(text, text, max_size=4)),
        cache_policy=common_pb2.CachePolicy(mode=draw(enum_number)),
    )
    if draw(st.booleans()):
        made.cache_policy.ttl.seconds = draw(st.integers(-(10**9), 10**9))
        made.cache_policy.ttl.nanos = draw(st.integers(-999_999_999, 999_999_999))
    if draw(st.booleans()):
        made.max_cost_usd_micros = draw(int64)
    if draw(st.booleans()):
        made.retrieval.collection = draw(text)
        made.retrieval.top_k = draw(int32)
        made.retrieval.min_score = draw(odd_float)
    if draw(st.booleans()):
        made.template.name = draw(text)
        made.template.variables.update({"x": draw(odd_float), "y": draw(text)})
    return made


@PROPERTY
@given(generate_requests())
def test_check_shape_accepts_or_refuses_with_field_violations(
    request: orchestrator_pb2.GenerateRequest,
) -> None:
    try:
        check_shape(request)
    except RequestInvalid as err:
        assert err.violations
        return
    params = request.params
    assert bool(request.model) != bool(request.route)
    assert len(request.messages) <= MAX_MESSAGES
    if params.HasField("temperature"):
        assert 0 <= params.temperature <= 2
    if params.HasField("top_p"):
        assert 0 < params.top_p <= 1
    if params.HasField("max_output_tokens"):
        assert params.max_output_tokens > 0
    assert request.priority in common_pb2.Priority.values()
    assert request.cache_policy.mode in common_pb2.CacheMode.values()
    for tool in params.tools:
        assert not tool.parameters_json or json_depth(tool.parameters_json) <= MAX_JSON_DEPTH


@PROPERTY
@given(
    st.sampled_from(["mock-fast", "mock-small", "mock-embed"]) | text,
    st.lists(message, max_size=4),
    generation_params(),
)
def test_check_generation_accepts_or_refuses(
    model: str, messages: list[common_pb2.ChatMessage], params: common_pb2.GenerationParams
) -> None:
    try:
        config, max_output = check_generation(CATALOG, model, messages, params)
    except (RequestInvalid, ModelNotFound):
        return
    assert 1 <= max_output <= config.max_output_tokens
    assert messages and all(m.role in common_pb2.Role.values() and m.role for m in messages)


@st.composite
def admit_requests(draw: st.DrawFn) -> control_pb2.AdmitRequest:
    made = control_pb2.AdmitRequest(
        request_id=draw(text | st.just("admit-1")),
        model=draw(text | st.just("mock-small")),
        estimated_input_tokens=draw(int64),
        max_output_tokens=draw(int64),
        priority=draw(enum_number),
        candidates=draw(st.lists(text, max_size=3)),
        guardrail_profile=draw(text),
    )
    if draw(st.booleans()):
        made.max_cost_usd_micros = draw(int64)
    return made


@PROPERTY
@given(admit_requests())
def test_check_admit_bounds_token_counts(request: control_pb2.AdmitRequest) -> None:
    try:
        _check_admit(request)
    except RequestInvalid:
        return
    assert 1 <= request.estimated_input_tokens <= MAX_TOKENS
    assert 1 <= request.max_output_tokens <= MAX_TOKENS
    assert request.priority in common_pb2.Priority.values()


@st.composite
def store_requests(draw: st.DrawFn) -> cache_pb2.StoreRequest:
    made = cache_pb2.StoreRequest(
        scope=cache_pb2.CacheScope(
            tenant_id=draw(text | st.just("acme")),
            model=draw(text | st.just("mock-small")),
            params=draw(generation_params()),
            semantic=cache_pb2.SemanticPolicy(min_similarity=draw(odd_float)),
        ),
        messages=draw(st.lists(message, max_size=3)),
        answer=cache_pb2.CachedAnswer(text=draw(text), finish_reason=draw(enum_number)),
    )
    if draw(st.booleans()):
        made.ttl.seconds = draw(st.integers(-(10**12), 10**12))
        made.ttl.nanos = draw(st.integers(-999_999_999, 999_999_999))
    return made


@PROPERTY
@given(store_requests())
def test_check_store_accepts_or_refuses(request: cache_pb2.StoreRequest) -> None:
    try:
        check_store(request)
    except RequestInvalid:
        return
    assert request.messages and request.scope.tenant_id and request.scope.model
    assert 0 <= request.scope.semantic.min_similarity <= 1
    if request.HasField("ttl"):
        assert request.ttl.ToNanoseconds() >= 1_000_000_000


@PROPERTY
@given(json_text)
def test_json_checks_never_recurse_too_deep(value: str) -> None:
    accepted = _is_json_object(value)
    if accepted:
        assert isinstance(json.loads(value), dict)
        assert json_depth(value) <= MAX_JSON_DEPTH


def test_a_document_nested_past_the_interpreter_stack_is_refused_not_raised() -> None:
    assert not _is_json_object(nested_json(100_000))
    assert not _is_json_object("[" * 1_000_000)
    assert json_depth('{"a": "[[[[ not nesting"}') == 1


def _user(content: str) -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=content)


def test_tool_schemas_nested_past_the_bound_name_the_field() -> None:
    params = common_pb2.GenerationParams(
        tools=[common_pb2.Tool(name="t", parameters_json=nested_json(MAX_JSON_DEPTH))]
    )
    try:
        check_generation(CATALOG, "mock-fast", [_user("x")], params)
    except RequestInvalid as err:
        assert [v.field for v in err.violations] == ["params.tools[0].parameters_json"]
    else:
        raise AssertionError("accepted a schema nested too deep")
