"""Checks of a generation request shared by the orchestrator (public edge) and the executor.

A bad request is refused with INVALID_ARGUMENT (every violation listed) or NOT_FOUND before
anything is reserved, cached or sent upstream.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from services.common.catalog import Catalog, ModelConfig
from services.common.errors import FieldViolation, ModelNotFound, RequestInvalid
from strata.common.v1 import common_pb2

REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
MAX_STOP_SEQUENCES = 4
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
        if message.role not in _ROLES:
            violations.append(FieldViolation(f"messages[{i}].role", "must be a known role"))
        elif message.role != common_pb2.ROLE_ASSISTANT and not message.content:
            violations.append(FieldViolation(f"messages[{i}].content", "must not be empty"))
    violations.extend(_check_params(params))
    if violations:
        raise RequestInvalid(violations)

    config = catalog.get(model)
    if config is None:
        raise ModelNotFound(model)
    max_output = config.max_output_tokens
    if params.HasField("max_output_tokens"):
        if params.max_output_tokens > config.max_output_tokens:
            raise RequestInvalid.field(
                "params.max_output_tokens",
                f"must be at most {config.max_output_tokens} for model {model!r}",
            )
        max_output = params.max_output_tokens
    return config, max_output


def _check_params(params: common_pb2.GenerationParams) -> list[FieldViolation]:
    violations = []
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
