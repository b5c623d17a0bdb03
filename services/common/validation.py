"""Checks of a generation request shared by the orchestrator (public edge) and the executor.

A bad request is refused with INVALID_ARGUMENT (every violation listed) or NOT_FOUND before
anything is reserved, cached or sent upstream.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence

from services.common.catalog import Catalog, ModelConfig
from services.common.errors import FieldViolation, ModelNotFound, RequestInvalid
from strata.common.v1 import common_pb2

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
_ROLES = frozenset(common_pb2.Role.values()) - {common_pb2.ROLE_UNSPECIFIED}


def check_request_id(request_id: str, field: str = "request_id") -> FieldViolation | None:
    """A violation when the id is not 1 to 128 characters of [A-Za-z0-9._:-]."""
    if REQUEST_ID.fullmatch(request_id):
        return None
    return FieldViolation(field, "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")


def check_generation(
    catalog: Catalog,
    model: str,
    messages: Sequence[common_pb2.ChatMessage],
    params: common_pb2.GenerationParams,
) -> tuple[ModelConfig, int]:
    """Validates a generation; returns the model and the effective max_output_tokens."""
    violations: list[FieldViolation] = []
    if not model:
        violations.append(FieldViolation("model", "is required"))
    if not messages:
        violations.append(FieldViolation("messages", "at least one message is required"))
    for i, message in enumerate(messages):
        violations.extend(_check_message(i, message))
    violations.extend(_check_params(params))
    if violations:
        raise RequestInvalid(violations)

    config = catalog.get(model)
    if config is None:
        raise ModelNotFound(model)
    if config.kind != "chat":
        raise RequestInvalid.field(
            "model", f"{model!r} is an {config.kind} model, not a chat model"
        )
    max_output = config.max_output_tokens
    if params.HasField("max_output_tokens"):
        if params.max_output_tokens > config.max_output_tokens:
            raise RequestInvalid.field(
                "params.max_output_tokens",
                f"must be at most {config.max_output_tokens} for model {model!r}",
            )
        max_output = params.max_output_tokens
    return config, max_output


def _check_message(i: int, message: common_pb2.ChatMessage) -> list[FieldViolation]:
    where = f"messages[{i}]"
    if message.role not in _ROLES:
        return [FieldViolation(f"{where}.role", "must be a known role")]
    violations = []
    if message.role == common_pb2.ROLE_ASSISTANT:
        for j, call in enumerate(message.tool_calls):
            if not call.id or not call.name:
                violations.append(FieldViolation(f"{where}.tool_calls[{j}]", "needs id and name"))
            if call.arguments_json and not _is_json_object(call.arguments_json):
                violations.append(
                    FieldViolation(f"{where}.tool_calls[{j}].arguments_json", "must be an object")
                )
    elif message.tool_calls:
        violations.append(FieldViolation(f"{where}.tool_calls", "only assistant messages"))
    if message.role == common_pb2.ROLE_TOOL and not message.tool_call_id:
        violations.append(FieldViolation(f"{where}.tool_call_id", "is required for a tool result"))
    if message.role != common_pb2.ROLE_ASSISTANT and not message.content:
        violations.append(FieldViolation(f"{where}.content", "must not be empty"))
    return violations


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _check_tools(params: common_pb2.GenerationParams) -> list[FieldViolation]:
    violations = []
    if len(params.tools) > MAX_TOOLS:
        violations.append(FieldViolation("params.tools", f"at most {MAX_TOOLS} tools"))
    names = [tool.name for tool in params.tools]
    for i, tool in enumerate(params.tools):
        if not TOOL_NAME.fullmatch(tool.name):
            violations.append(
                FieldViolation(f"params.tools[{i}].name", "1 to 64 characters of A-Z a-z 0-9 _ -")
            )
        if tool.parameters_json and not _is_json_object(tool.parameters_json):
            violations.append(
                FieldViolation(f"params.tools[{i}].parameters_json", "must be a JSON object")
            )
    if len(set(names)) != len(names):
        violations.append(FieldViolation("params.tools", "names must be distinct"))
    choice = params.tool_choice
    if choice.mode not in common_pb2.ToolChoiceMode.values():
        violations.append(FieldViolation("params.tool_choice.mode", "must be a known mode"))
    needs_tools = choice.mode in (
        common_pb2.TOOL_CHOICE_MODE_AUTO,
        common_pb2.TOOL_CHOICE_MODE_REQUIRED,
        common_pb2.TOOL_CHOICE_MODE_FUNCTION,
    )
    if needs_tools and not params.tools:
        violations.append(FieldViolation("params.tool_choice", "needs params.tools"))
    if choice.mode == common_pb2.TOOL_CHOICE_MODE_FUNCTION and choice.function_name not in names:
        violations.append(
            FieldViolation("params.tool_choice.function_name", "must name one of params.tools")
        )
    return violations


def _check_response_format(fmt: common_pb2.ResponseFormat) -> list[FieldViolation]:
    if fmt.type not in common_pb2.ResponseFormatType.values():
        return [FieldViolation("params.response_format.type", "must be a known type")]
    if fmt.type != common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA:
        return []
    violations = []
    if not TOOL_NAME.fullmatch(fmt.schema_name):
        violations.append(
            FieldViolation("params.response_format.schema_name", "1 to 64 of A-Z a-z 0-9 _ -")
        )
    if not _is_json_object(fmt.json_schema):
        violations.append(
            FieldViolation("params.response_format.json_schema", "must be a JSON object")
        )
    return violations


def _check_params(params: common_pb2.GenerationParams) -> list[FieldViolation]:
    violations = _check_tools(params) + _check_response_format(params.response_format)
    if params.HasField("temperature") and not 0 <= params.temperature <= 2:
        violations.append(FieldViolation("params.temperature", "must be between 0 and 2"))
    if params.HasField("top_p") and not 0 < params.top_p <= 1:
        violations.append(FieldViolation("params.top_p", "must be greater than 0 and at most 1"))
    if params.HasField("max_output_tokens") and params.max_output_tokens <= 0:
        violations.append(FieldViolation("params.max_output_tokens", "must be greater than 0"))
    if len(params.stop) > MAX_STOP_SEQUENCES:
        violations.append(FieldViolation("params.stop", f"at most {MAX_STOP_SEQUENCES} sequences"))
    if any(not s for s in params.stop):
        violations.append(FieldViolation("params.stop", "sequences must not be empty"))
    return violations


def estimate_input_tokens(messages: Sequence[common_pb2.ChatMessage]) -> int:
    """A cautious estimate of prompt tokens: a token per 4 bytes of UTF-8, plus framing.

    Bytes rather than characters keep the estimate from falling far short on scripts
    that take several bytes (and usually about a token) per character.
    """
    total = 3
    for message in messages:
        total += 4 + math.ceil(len(message.content.encode()) / 4)
    return total
