"""Helpers over the chat types every service shares."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from strata.common.v1 import common_pb2


def assemble_tool_calls(pieces: Iterable[common_pb2.ToolCallDelta]) -> list[common_pb2.ToolCall]:
    """Whole tool calls from their streamed pieces, in index order."""
    calls: dict[int, common_pb2.ToolCall] = {}
    for piece in pieces:
        call = calls.setdefault(piece.index, common_pb2.ToolCall())
        call.id = call.id or piece.id
        call.name = call.name or piece.name
        call.arguments_json += piece.arguments_json
    return [calls[i] for i in sorted(calls)]


def tool_call_pieces(calls: Sequence[common_pb2.ToolCall]) -> list[common_pb2.ToolCallDelta]:
    """Whole tool calls as one piece each, to stream them."""
    return [
        common_pb2.ToolCallDelta(index=i, id=c.id, name=c.name, arguments_json=c.arguments_json)
        for i, c in enumerate(calls)
    ]
