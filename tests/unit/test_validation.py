"""Checks of generation requests shared by the orchestrator and the executor."""

import pytest

from services.common.catalog import Catalog
from services.common.errors import ModelNotFound, RequestInvalid
from services.common.validation import (
    check_generation,
    check_request_id,
    estimate_input_tokens,
)
from strata.common.v1 import common_pb2

CATALOG = Catalog.model_validate(
    {
        "providers": {"mock": {"kind": "mock"}},
        "models": {
            "small": {"provider": "mock", "upstream_model": "echo", "max_output_tokens": 256},
            "large": {"provider": "mock", "upstream_model": "echo", "max_output_tokens": 8192},
        },
    }
)


def msg(role: int = common_pb2.ROLE_USER, content: str = "hello") -> common_pb2.ChatMessage:
    return common_pb2.ChatMessage(role=role, content=content)  # type: ignore[arg-type]


def violated_fields(error: RequestInvalid) -> list[str]:
    return [v.field for v in error.violations]


def test_valid_request_returns_model_and_default_max_output():
    config, max_output = check_generation(CATALOG, "small", [msg()], common_pb2.GenerationParams())

    assert config.name == "small"
    assert max_output == 256
    assert check_generation(CATALOG, "large", [msg()], common_pb2.GenerationParams())[1] == 8192


def test_explicit_max_output_within_limit_is_used():
    params = common_pb2.GenerationParams(max_output_tokens=100)

    assert check_generation(CATALOG, "small", [msg()], params)[1] == 100


def test_max_output_equal_to_the_model_limit_is_accepted():
    params = common_pb2.GenerationParams(max_output_tokens=256)

    assert check_generation(CATALOG, "small", [msg()], params)[1] == 256


def test_max_output_above_the_model_limit_is_refused():
    params = common_pb2.GenerationParams(max_output_tokens=257)

    with pytest.raises(RequestInvalid) as caught:
        check_generation(CATALOG, "small", [msg()], params)

    assert violated_fields(caught.value) == ["params.max_output_tokens"]
    assert "256" in caught.value.violations[0].description
    # The same value fits a model with a higher limit.
    assert check_generation(CATALOG, "large", [msg()], params)[1] == 257


def test_every_violation_is_listed_at_once():
    params = common_pb2.GenerationParams(
        temperature=2.5, top_p=0.0, max_output_tokens=0, stop=["a", "b", "c", "d", "e"]
    )
    messages = [
        msg(common_pb2.ROLE_UNSPECIFIED, "x"),
        msg(99, "x"),
        msg(common_pb2.ROLE_USER, ""),
        msg(common_pb2.ROLE_SYSTEM, "fine"),
    ]

    with pytest.raises(RequestInvalid) as caught:
        check_generation(CATALOG, "", messages, params)

    assert sorted(violated_fields(caught.value)) == sorted(
        [
            "model",
            "messages[0].role",
            "messages[1].role",
            "messages[2].content",
            "params.temperature",
            "params.top_p",
            "params.max_output_tokens",
            "params.stop",
        ]
    )


def test_empty_messages_and_empty_stop_are_violations():
    params = common_pb2.GenerationParams(stop=["ok", ""])

    with pytest.raises(RequestInvalid) as caught:
        check_generation(CATALOG, "small", [], params)

    assert sorted(violated_fields(caught.value)) == ["messages", "params.stop"]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (common_pb2.GenerationParams(temperature=-0.1), "params.temperature"),
        (common_pb2.GenerationParams(temperature=2.01), "params.temperature"),
        (common_pb2.GenerationParams(temperature=float("nan")), "params.temperature"),
        (common_pb2.GenerationParams(top_p=0.0), "params.top_p"),
        (common_pb2.GenerationParams(top_p=1.01), "params.top_p"),
        (common_pb2.GenerationParams(max_output_tokens=0), "params.max_output_tokens"),
        (common_pb2.GenerationParams(max_output_tokens=-5), "params.max_output_tokens"),
        (common_pb2.GenerationParams(stop=["1", "2", "3", "4", "5"]), "params.stop"),
        (common_pb2.GenerationParams(stop=[""]), "params.stop"),
    ],
)
def test_single_bad_parameter_is_refused(params, field):
    with pytest.raises(RequestInvalid) as caught:
        check_generation(CATALOG, "small", [msg()], params)

    assert violated_fields(caught.value) == [field]


@pytest.mark.parametrize(
    "params",
    [
        common_pb2.GenerationParams(temperature=0.0),
        common_pb2.GenerationParams(temperature=2.0),
        common_pb2.GenerationParams(top_p=1.0),
        common_pb2.GenerationParams(top_p=0.01),
        common_pb2.GenerationParams(stop=["1", "2", "3", "4"]),
        common_pb2.GenerationParams(max_output_tokens=1),
    ],
)
def test_boundary_parameters_are_accepted(params):
    config, _ = check_generation(CATALOG, "small", [msg()], params)

    assert config.name == "small"


def test_unknown_model_is_not_found():
    with pytest.raises(ModelNotFound) as caught:
        check_generation(CATALOG, "missing", [msg()], common_pb2.GenerationParams())

    assert caught.value.metadata == {"model": "missing"}


def test_invalid_request_is_refused_before_the_model_is_looked_up():
    with pytest.raises(RequestInvalid):
        check_generation(CATALOG, "missing", [], common_pb2.GenerationParams())


def test_assistant_message_may_be_empty_but_others_may_not():
    messages = [msg(common_pb2.ROLE_USER, "hi"), msg(common_pb2.ROLE_ASSISTANT, "")]

    config, _ = check_generation(CATALOG, "small", messages, common_pb2.GenerationParams())
    assert config.name == "small"

    tool_result = msg(common_pb2.ROLE_TOOL, "")
    tool_result.tool_call_id = "call_1"
    for message in (msg(common_pb2.ROLE_SYSTEM, ""), tool_result):
        with pytest.raises(RequestInvalid) as caught:
            check_generation(CATALOG, "small", [message], common_pb2.GenerationParams())
        assert violated_fields(caught.value) == ["messages[0].content"]


def test_request_id_of_128_valid_characters_is_accepted():
    assert check_request_id("aZ09._:-" * 16) is None


@pytest.mark.parametrize(
    "request_id", ["a" * 129, "has space", "", "tab\there", "newline\n", "é", "a/b"]
)
def test_bad_request_id_is_refused(request_id):
    violation = check_request_id(request_id, field="x_request_id")

    assert violation is not None
    assert violation.field == "x_request_id"


def test_estimate_grows_with_content():
    short = estimate_input_tokens([msg(content="a" * 4)])
    longer = estimate_input_tokens([msg(content="a" * 400)])
    two = estimate_input_tokens([msg(content="a" * 4), msg(content="a" * 4)])

    assert longer - short == 99
    assert two > short
    assert estimate_input_tokens([]) < short


def test_estimate_counts_multibyte_text_by_bytes():
    ascii_text = "a" * 40
    cjk_text = "字" * 40  # three bytes each in UTF-8

    ascii_estimate = estimate_input_tokens([msg(content=ascii_text)])
    cjk_estimate = estimate_input_tokens([msg(content=cjk_text)])

    assert cjk_estimate - ascii_estimate == (120 - 40) // 4


def tool(name: str = "lookup", parameters: str = '{"type": "object"}') -> common_pb2.Tool:
    return common_pb2.Tool(name=name, description="finds things", parameters_json=parameters)


@pytest.mark.parametrize(
    ("params", "fields"),
    [
        (common_pb2.GenerationParams(tools=[tool("has space")]), ["params.tools[0].name"]),
        (
            common_pb2.GenerationParams(tools=[tool(parameters="[1, 2]")]),
            ["params.tools[0].parameters_json"],
        ),
        (common_pb2.GenerationParams(tools=[tool(), tool()]), ["params.tools"]),
        (
            common_pb2.GenerationParams(
                tool_choice=common_pb2.ToolChoice(mode=common_pb2.TOOL_CHOICE_MODE_REQUIRED)
            ),
            ["params.tool_choice"],
        ),
        (
            common_pb2.GenerationParams(
                tools=[tool()],
                tool_choice=common_pb2.ToolChoice(
                    mode=common_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="other"
                ),
            ),
            ["params.tool_choice.function_name"],
        ),
        (
            common_pb2.GenerationParams(
                response_format=common_pb2.ResponseFormat(
                    type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, json_schema="nope"
                )
            ),
            ["params.response_format.schema_name", "params.response_format.json_schema"],
        ),
    ],
    ids=[
        "bad-name",
        "schema-not-object",
        "duplicate",
        "choice-without-tools",
        "unknown-function",
        "schema",
    ],
)
def test_tools_and_formats_are_checked(params, fields):
    with pytest.raises(RequestInvalid) as caught:
        check_generation(CATALOG, "small", [msg()], params)
    assert violated_fields(caught.value) == fields


def test_valid_tools_and_schema_pass():
    params = common_pb2.GenerationParams(
        tools=[tool(), tool("other", "")],
        tool_choice=common_pb2.ToolChoice(
            mode=common_pb2.TOOL_CHOICE_MODE_FUNCTION, function_name="other"
        ),
        response_format=common_pb2.ResponseFormat(
            type=common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA,
            schema_name="answer",
            json_schema='{"type": "object"}',
        ),
    )
    config, _ = check_generation(CATALOG, "small", [msg()], params)
    assert config.name == "small"


def test_tool_call_messages_are_checked():
    call = common_pb2.ToolCall(id="call_1", name="lookup", arguments_json="{}")
    good = [
        msg(),
        common_pb2.ChatMessage(role=common_pb2.ROLE_ASSISTANT, tool_calls=[call]),
        common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, tool_call_id="call_1", content="42"),
    ]
    check_generation(CATALOG, "small", good, common_pb2.GenerationParams())
    bad = [
        common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="x", tool_calls=[call]),
        common_pb2.ChatMessage(role=common_pb2.ROLE_TOOL, content="42"),
        common_pb2.ChatMessage(
            role=common_pb2.ROLE_ASSISTANT, tool_calls=[common_pb2.ToolCall(name="lookup")]
        ),
    ]
    with pytest.raises(RequestInvalid) as caught:
        check_generation(CATALOG, "small", bad, common_pb2.GenerationParams())
    assert violated_fields(caught.value) == [
        "messages[0].tool_calls",
        "messages[1].tool_call_id",
        "messages[2].tool_calls[0]",
    ]


def test_an_embedding_model_cannot_chat():
    catalog = Catalog.model_validate(
        {
            "providers": {"p": {"kind": "mock"}},
            "models": {"vec": {"provider": "p", "upstream_model": "v", "kind": "embedding"}},
        }
    )
    with pytest.raises(RequestInvalid) as caught:
        check_generation(catalog, "vec", [msg()], common_pb2.GenerationParams())
    assert violated_fields(caught.value) == ["model"]
