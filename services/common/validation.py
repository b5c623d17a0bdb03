"""Checks of a generation request shared by the orchestrator (public edge) and the executor.

A bad request is refused with INVALID_ARGUMENT (every violation listed) or NOT_FOUND before
anything is reserved, cached or sent upstream.

Hostile input is bounded here, not left to whatever breaks first downstream: message counts,
the length of every name and id a reply may echo, map sizes, the nesting depth of JSON (a
deep document would otherwise overflow the parser's recursion), numbers that are NaN,
infinite or out of range, and enum values this build does not know (proto3 keeps them).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence

from google.protobuf import duration_pb2, struct_pb2

from services.common.catalog import Catalog, ModelConfig
from services.common.errors import FieldViolation, ModelNotFound, RequestInvalid
from strata.common.v1 import common_pb2

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
TENANT_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
"""A tenant id as control issues them (it is part of Redis keys)."""
MAX_STOP_SEQUENCES = 4
MAX_STOP_CHARS = 256
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_MESSAGES = 1000
"""Messages in one conversation (the byte size is bounded by the gRPC message limit)."""
MAX_NAME_CHARS = 128
"""Longest model, route, template, collection or message name (names are echoed in errors)."""
MAX_ID_CHARS = 256
"""Longest tool call id."""
MAX_JSON_DEPTH = 64
"""Deepest nesting of a JSON document (tool schemas and arguments, response schemas)."""
MAX_STRUCT_DEPTH = 16
"""Deepest nesting of a Struct (template variables, pipeline inputs); protobuf's own parser
gives up near 32 (each level is a Struct, a map entry and a Value)."""
MAX_MAP_ENTRIES = 64
MAX_MAP_KEY_CHARS = 128
MAX_MAP_VALUE_CHARS = 1024
MAX_TOKENS = 10_000_000
"""The most tokens one request may declare (input or output): far above any context window,
far below where Redis's Lua numbers (doubles) lose precision."""
_ROLES = frozenset(common_pb2.Role.values()) - {common_pb2.ROLE_UNSPECIFIED}


def check_request_id(request_id: str, field: str = "request_id") -> FieldViolation | None:
    """A violation when the id is not 1 to 128 characters of [A-Za-z0-9._:-]."""
    if REQUEST_ID.fullmatch(request_id):
        return None
    return FieldViolation(field, "must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")


def check_name(value: str, field: str, *, required: bool = True) -> FieldViolation | None:
    """A violation when a name is missing (if required), too long or holds control characters."""
    if not value:
        return FieldViolation(field, "is required") if required else None
    if len(value) > MAX_NAME_CHARS or not value.isprintable():
        return FieldViolation(field, f"at most {MAX_NAME_CHARS} printable characters")
    return None


def check_map(values: Mapping[str, str], field: str) -> list[FieldViolation]:
    """Violations of a string map's bounds (entries, key and value lengths)."""
    if len(values) > MAX_MAP_ENTRIES:
        return [FieldViolation(field, f"at most {MAX_MAP_ENTRIES} entries")]
    for key, value in values.items():
        if not key or len(key) > MAX_MAP_KEY_CHARS or not key.isprintable():
            return [
                FieldViolation(field, f"keys are 1 to {MAX_MAP_KEY_CHARS} printable characters")
            ]
        if len(value) > MAX_MAP_VALUE_CHARS:
            return [FieldViolation(f"{field}[{key}]", f"at most {MAX_MAP_VALUE_CHARS} characters")]
    return []


def is_finite_between(value: float, low: float, high: float) -> bool:
    """Whether low <= value <= high (False for NaN)."""
    return math.isfinite(value) and low <= value <= high


def is_duration_at_least(value: duration_pb2.Duration, minimum_ns: int) -> bool:
    """A well-formed Duration (nanos in range, of the seconds' sign) of at least minimum_ns."""
    seconds, nanos = value.seconds, value.nanos
    if not -999_999_999 <= nanos <= 999_999_999 or seconds * nanos < 0:
        return False
    return seconds * 1_000_000_000 + nanos >= minimum_ns


def check_struct(value: struct_pb2.Struct, field: str) -> list[FieldViolation]:
    """Violations of a Struct's bounds: entries at the top, nesting depth (walked without
    recursion) and numbers JSON cannot carry (NaN, infinities)."""
    if len(value.fields) > MAX_MAP_ENTRIES:
        return [FieldViolation(field, f"at most {MAX_MAP_ENTRIES} entries")]
    pending: list[tuple[struct_pb2.Struct | struct_pb2.ListValue, int]] = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > MAX_STRUCT_DEPTH:
            return [FieldViolation(field, f"nested at most {MAX_STRUCT_DEPTH} deep")]
        children = node.fields.values() if isinstance(node, struct_pb2.Struct) else node.values
        for child in children:
            kind = child.WhichOneof("kind")
            if kind == "struct_value":
                pending.append((child.struct_value, depth + 1))
            elif kind == "list_value":
                pending.append((child.list_value, depth + 1))
            elif kind == "number_value" and not math.isfinite(child.number_value):
                return [FieldViolation(field, "numbers must be finite")]
    return []


def check_generation(
    catalog: Catalog,
    model: str,
    messages: Sequence[common_pb2.ChatMessage],
    params: common_pb2.GenerationParams,
) -> tuple[ModelConfig, int]:
    """Validates a generation; returns the model and the effective max_output_tokens."""
    violations: list[FieldViolation] = []
    if violation := check_name(model, "model"):
        violations.append(violation)
    if not messages:
        violations.append(FieldViolation("messages", "at least one message is required"))
    violations.extend(check_messages(messages))
    violations.extend(check_params(params))
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


def check_messages(
    messages: Sequence[common_pb2.ChatMessage], field: str = "messages"
) -> list[FieldViolation]:
    """Violations of a conversation's messages (an empty one is the caller's to refuse)."""
    if len(messages) > MAX_MESSAGES:
        return [FieldViolation(field, f"at most {MAX_MESSAGES} messages")]
    violations = []
    for i, message in enumerate(messages):
        violations.extend(_check_message(f"{field}[{i}]", message))
    return violations


def _check_message(where: str, message: common_pb2.ChatMessage) -> list[FieldViolation]:
    if message.role not in _ROLES:
        return [FieldViolation(f"{where}.role", "must be a known role")]
    violations = []
    if message.name and not TOOL_NAME.fullmatch(message.name):
        violations.append(FieldViolation(f"{where}.name", "1 to 64 characters of A-Z a-z 0-9 _ -"))
    if len(message.tool_call_id) > MAX_ID_CHARS or not message.tool_call_id.isprintable():
        violations.append(
            FieldViolation(f"{where}.tool_call_id", f"at most {MAX_ID_CHARS} printable characters")
        )
    if message.role == common_pb2.ROLE_ASSISTANT:
        if len(message.tool_calls) > MAX_TOOLS:
            violations.append(FieldViolation(f"{where}.tool_calls", f"at most {MAX_TOOLS} calls"))
        for j, call in enumerate(message.tool_calls[:MAX_TOOLS]):
            if not call.id or not call.name:
                violations.append(FieldViolation(f"{where}.tool_calls[{j}]", "needs id and name"))
            elif len(call.id) > MAX_ID_CHARS or not TOOL_NAME.fullmatch(call.name):
                violations.append(
                    FieldViolation(
                        f"{where}.tool_calls[{j}]",
                        f"id of at most {MAX_ID_CHARS} characters, name of 1 to 64 A-Z a-z 0-9 _ -",
                    )
                )
            if call.arguments_json and not _is_json_object(call.arguments_json):
                violations.append(
                    FieldViolation(
                        f"{where}.tool_calls[{j}].arguments_json",
                        f"must be a JSON object nested at most {MAX_JSON_DEPTH} deep",
                    )
                )
    elif message.tool_calls:
        violations.append(FieldViolation(f"{where}.tool_calls", "only assistant messages"))
    if message.role == common_pb2.ROLE_TOOL and not message.tool_call_id:
        violations.append(FieldViolation(f"{where}.tool_call_id", "is required for a tool result"))
    if message.role != common_pb2.ROLE_ASSISTANT and not message.content:
        violations.append(FieldViolation(f"{where}.content", "must not be empty"))
    return violations


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in a JSON text, found without recursion
    (brackets inside strings do not count; the text need not be valid JSON)."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def _is_json_object(text: str) -> bool:
    if json_depth(text) > MAX_JSON_DEPTH:
        return False
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
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
                FieldViolation(
                    f"params.tools[{i}].parameters_json",
                    f"must be a JSON object nested at most {MAX_JSON_DEPTH} deep",
                )
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
            FieldViolation(
                "params.response_format.json_schema",
                f"must be a JSON object nested at most {MAX_JSON_DEPTH} deep",
            )
        )
    return violations


def check_params(params: common_pb2.GenerationParams) -> list[FieldViolation]:
    """Violations of generation parameters that need no model to judge."""
    violations = _check_tools(params) + _check_response_format(params.response_format)
    if params.HasField("temperature") and not is_finite_between(params.temperature, 0, 2):
        violations.append(FieldViolation("params.temperature", "must be between 0 and 2"))
    if params.HasField("top_p") and not (
        is_finite_between(params.top_p, 0, 1) and params.top_p > 0
    ):
        violations.append(FieldViolation("params.top_p", "must be greater than 0 and at most 1"))
    if params.HasField("max_output_tokens") and params.max_output_tokens <= 0:
        violations.append(FieldViolation("params.max_output_tokens", "must be greater than 0"))
    if len(params.stop) > MAX_STOP_SEQUENCES:
        violations.append(FieldViolation("params.stop", f"at most {MAX_STOP_SEQUENCES} sequences"))
    if any(not s or len(s) > MAX_STOP_CHARS for s in params.stop):
        violations.append(
            FieldViolation("params.stop", f"sequences are 1 to {MAX_STOP_CHARS} characters")
        )
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
