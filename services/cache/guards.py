"""Guards for the semantic cache: refuse to serve a stored answer for a close-but-different question.

First version; being extended.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Rejection:
    guard: str
    detail: str


_WS = re.compile(r"\s+")


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if unicodedata.category(ch) != "Cf")
    return _WS.sub(" ", text).strip()


_NUM = re.compile(r"\d+(?:[.,:/-]\d+)*")


def _numbers(new: str, stored: str) -> Rejection | None:
    a = Counter(_NUM.findall(new))
    b = Counter(_NUM.findall(stored))
    if a != b:
        return Rejection("numbers", "number multisets differ")
    return None


GUARDS: tuple[str, ...] = ("numbers",)


def check(new: str, stored: str) -> Rejection | None:
    a = normalize(new).casefold()
    b = normalize(stored).casefold()
    return _numbers(a, b)
