"""The executor's server-sent events decoder: events whole, however the body is cut."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.errors import BadUpstreamResponse
from services.executor.providers.base import Content, TextDelta, ToolCallPiece, coalesced
from services.executor.providers.http import MAX_EVENT_BYTES, ServerSentEvent, SSEDecoder
from strata.common.v1 import common_pb2

BODY = (
    ": a comment, then a named event\r\n"
    "event: message_start\r\n"
    'data: {"type":"message_start"}\r\n'
    "\r\n"
    "data: first line\n"
    "data:second line\n"
    "\n"
    "id: 7\r"
    "data: café ☕\r"
    "\r"
    "event: ping\n"
    "\n"
    "data: [DONE]\n"
    "\n"
    "data: never ended"
).encode()
EVENTS = [
    ServerSentEvent("message_start", '{"type":"message_start"}'),
    ServerSentEvent("message", "first line\nsecond line"),
    ServerSentEvent("message", "café ☕"),
    ServerSentEvent("message", "[DONE]"),
]


def decode(pieces: list[bytes]) -> list[ServerSentEvent]:
    decoder = SSEDecoder("up")
    return [event for piece in pieces for event in decoder.feed(piece)]


def test_a_body_in_one_piece() -> None:
    """CRLF, LF and CR end lines; comments, ids and events without data are not events; the
    last event, never ended by a blank line, is not one either."""
    assert decode([BODY]) == EVENTS


def test_a_body_byte_by_byte() -> None:
    """A CRLF cut between its CR and LF is one line end; a character cut between its bytes
    is whole."""
    assert decode([BODY[i : i + 1] for i in range(len(BODY))]) == EVENTS


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=len(BODY)), max_size=12))
def test_any_cut_of_the_body_gives_the_same_events(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(BODY)]
    assert decode([BODY[a:b] for a, b in itertools.pairwise(bounds)]) == EVENTS


def test_an_event_is_given_once_its_blank_line_came() -> None:
    decoder = SSEDecoder("up")
    assert decoder.feed(b"data: one\n") == []
    assert decoder.feed(b"\ndata: two\n\n") == [
        ServerSentEvent("message", "one"),
        ServerSentEvent("message", "two"),
    ]


def test_an_event_that_never_ends_is_refused_not_buffered() -> None:
    decoder = SSEDecoder("up")
    for _ in range(MAX_EVENT_BYTES // 65_536 - 1):
        assert decoder.feed(b"data: " + b"x" * 65_530) == []
    with pytest.raises(BadUpstreamResponse):
        decoder.feed(b"x" * 2 * 65_536)


def test_the_bound_is_per_event() -> None:
    decoder = SSEDecoder("up")
    event = b"data: " + b"x" * 65_536 + b"\n\n"
    for _ in range(2 * MAX_EVENT_BYTES // len(event)):
        assert len(decoder.feed(event)) == 1


def test_runs_of_text_join_and_tool_pieces_keep_their_place() -> None:
    piece = ToolCallPiece(common_pb2.ToolCallDelta(index=0, name="lookup"))
    events: list[Content] = [TextDelta("a"), TextDelta("b"), piece, TextDelta("c"), TextDelta("d")]
    assert coalesced(events) == [TextDelta("ab"), piece, TextDelta("cd")]
    assert coalesced([]) == []
