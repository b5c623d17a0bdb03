"""Guardrails: checks of a request's prompt and of the model's answer, per profile.

A profile (from `config/guardrails.yaml`) says which rules run and what each does when it
fires: BLOCK the request, REDACT the matched span, or only FLAG it. Rules come in families;
a profile names a family (`pii`) or a single rule (`pii.credit_card`), the most specific key
wins, and a rule no key covers is off.

    pii.*        email, phone, credit_card, iban, us_ssn, uk_nino, es_dni, in_aadhaar
    secret.*     aws_access_key, github_token, slack_token, openai_key, anthropic_key,
                 google_api_key, private_key, jwt, strata_key, high_entropy
    injection.*  ignore_instructions, role_override, system_prompt_leak, delimiter
    deny.term, deny.topic.<topic>   the profile's own words and phrases (deny_action)
    limit.prompt_tokens             the caller's token estimate over max_prompt_tokens

Every detector is a pattern that finds candidates plus a validator that keeps false
positives low: Luhn and issuer prefixes for cards, mod-97 for IBANs, the Verhoeff digit for
Aadhaar, the DNI letter, the SSN and NINO allocation rules, phone shapes that are not dates,
versions or card numbers, a decodable JSON header for JWTs, and for unlabelled secrets a
keyword (key, token, password, bearer...) before a token of high Shannon entropy.

Normalisation. Text is matched on a normalised copy so that unicode tricks do not evade the
rules: compatibility folding (NFKC's full-width digits and letters, ligatures, math
letters), combining marks dropped, zero-width and other format characters removed (U+200B,
U+2060, U+FEFF, soft hyphen, bidi controls...), other scripts' decimal digits read as ASCII,
and Cyrillic/Greek look-alikes mapped to the Latin letters they imitate. Word rules
(injection, deny) also casefold. Findings are still reported as spans of the ORIGINAL text,
because that is the text a caller redacts, logs offsets into, or cuts: the copy is built
one original character at a time (each becomes zero, one or several characters), so every
position of the copy maps back to the original character it came from, and a match maps
to the exact original characters, invisible ones inside it included. Redaction replaces
those characters and nothing else. Pure ASCII text (most prompts) is its own normalised
copy, and the maps are only built for non-ASCII text that has a finding.

Findings never hold the matched text: it may be the very PII or secret being protected.
Patterns are compiled once at import (the rules) or once per profile (deny terms). Every
candidate pattern is bounded or possessive and each stretch of text is read a bounded
number of times, so a check stays linear in the text's length; a streamed answer is
checked by `OutputScanner` over a bounded window, so it is linear too.

Known limits: heuristics, not a classifier (paraphrased injections pass); IBAN, NINO and
NIE letters are matched in capitals, as printed; confusables cover the common Cyrillic and
Greek look-alikes, not all of Unicode's; an unlabelled token is only taken for a secret
after a keyword and up to 4096 characters long; a secret longer than the scanner's window
is not seen whole when streamed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import bisect
import enum
import json
import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from services.common.settings import ConfigError

INLINE_SCAN_CHARS = 16 * 1024
"""Texts up to this many characters are scanned on the caller's event loop; longer ones in a
worker thread. A scan costs up to about a millisecond per kilobyte (a text of `a@a@…`, the
e-mail rule), so a 2 MB prompt held an event loop, and every other tenant's calls on it,
for 2 s; in a thread the loop still runs between the scan's slices of the interpreter lock
(at most about 11 ms apart, measured)."""

__all__ = [
    "RULE_FAMILIES",
    "RULE_IDS",
    "Action",
    "Finding",
    "GuardrailProfile",
    "Guardrails",
    "GuardrailsFile",
    "OutputScanner",
    "Verdict",
]


class Action(enum.StrEnum):
    """What a rule does when it fires."""

    BLOCK = "block"
    """Refuse the request (or cut the answer)."""
    REDACT = "redact"
    """Replace the matched span with `[REDACTED:<RULE>]` and go on."""
    FLAG = "flag"
    """Record the finding only."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One rule that fired, and where. Never holds the matched text."""

    rule: str
    """Stable dotted id, e.g. `pii.email`, `deny.topic.weapons`, `limit.prompt_tokens`."""
    action: Action
    text_index: int
    """Which input text (0-based) the span is in; -1 when the finding is not a span."""
    start: int
    """Start of the span in the original text; -1 when the finding is not a span."""
    end: int
    """End (exclusive) of the span in the original text; -1 when not a span."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """Everything the rules found in a check, in text order."""

    findings: tuple[Finding, ...]
    redacted: tuple[str, ...] | None = None
    """The texts with every REDACT span replaced, or None when nothing was redacted."""

    @property
    def blocked(self) -> bool:
        """Whether any finding blocks."""
        return any(f.action is Action.BLOCK for f in self.findings)

    @property
    def blocking(self) -> Finding | None:
        """The first finding that blocks, or None."""
        return next((f for f in self.findings if f.action is Action.BLOCK), None)


# --------------------------------------------------------------------------- normalisation

# Rendered blank but not format characters: Hangul fillers, the combining grapheme joiner.
_INVISIBLE = frozenset("\u115f\u1160\u3164\uffa0\u034f")

# Cyrillic and Greek letters that look like Latin ones (a subset of Unicode's confusables).
_CONFUSABLES = {
    **dict(zip("аеорсухіјѕԁһӏԛԝɡıȷ", "aeopcyxijsdhlqwgij", strict=True)),
    **dict(zip("АВЕКМНОРСТХУЅІЈ", "ABEKMHOPCTXYSIJ", strict=True)),  # noqa: RUF001
    **dict(zip("αονικρυχε", "aovikpuxe", strict=True)),
    **dict(zip("ΑΒΕΖΗΙΚΜΝΟΡΤΥΧ", "ABEZHIKMNOPTYX", strict=True)),  # noqa: RUF001
}


def _fold_piece(piece: str) -> str:
    out = []
    for c in piece:
        category = unicodedata.category(c)
        if category in ("Mn", "Me"):
            continue
        if not c.isascii() and c.isdecimal():
            c = str(unicodedata.decimal(c))
        out.append(_CONFUSABLES.get(c, c))
    return "".join(out)


def _fold_char(c: str) -> tuple[str, str]:
    """The (case-kept, casefolded) normalised forms of one non-ASCII character."""
    if c in _INVISIBLE or unicodedata.category(c) == "Cf":
        return "", ""
    kept = _fold_piece(unicodedata.normalize("NFKD", c))
    return kept, _fold_piece(unicodedata.normalize("NFKD", kept.casefold()))


class _FoldTable(dict[int, str]):
    """A `str.translate` table from a character to one of its normalised forms, filled in
    as characters are met (bounded, so text with every code point cannot grow it forever)."""

    def __init__(self, casefolded: bool) -> None:
        super().__init__()
        self._form = int(casefolded)

    def __missing__(self, code: int) -> str:
        value = _fold_char(chr(code))[self._form]
        if len(self) < 1 << 16:
            self[code] = value
        return value


_KEEP_CASE = _FoldTable(casefolded=False)
_FOLD_CASE = _FoldTable(casefolded=True)
_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


class _Text:
    """A text's normalised copies: `kept` keeps case (secrets, PII), `folded` is casefolded
    (word rules). Each is built character by character from the original, so every one of
    its characters comes from one original character; the maps from copy positions back to
    original ones are only built when a finding needs them."""

    __slots__ = ("_maps", "_runs", "folded", "kept", "original")

    def __init__(self, text: str) -> None:
        self.original = text
        self._runs: list[_NumberRun] | None = None
        self._maps: tuple[list[int], list[int], list[int], list[int]] | None = None
        if text.isascii():
            self.kept = text
            self.folded = text.lower()
            return
        kept = []
        folded = []
        pos = 0
        for run in _NON_ASCII.finditer(text):
            ascii_part = text[pos : run.start()]
            kept.append(ascii_part)
            folded.append(ascii_part.lower())
            chars = run.group()
            kept.append(chars.translate(_KEEP_CASE))
            folded.append(chars.translate(_FOLD_CASE))
            pos = run.end()
        kept.append(text[pos:])
        folded.append(text[pos:].lower())
        self.kept = "".join(kept)
        self.folded = "".join(folded)

    def original_span(self, folded: bool, start: int, end: int) -> tuple[int, int]:
        """The span of the original text that a span of `kept` or `folded` came from."""
        if self._maps is None:
            if self.original.isascii():
                return start, end
            self._maps = self._build_maps()
        starts, ends = (self._maps[2], self._maps[3]) if folded else self._maps[:2]
        return starts[start], ends[end - 1]

    def _build_maps(self) -> tuple[list[int], list[int], list[int], list[int]]:
        """For each character of `kept` and of `folded`: the original character's span."""
        text = self.original
        k_starts: list[int] = []
        k_ends: list[int] = []
        f_starts: list[int] = []
        f_ends: list[int] = []
        pos = 0
        for run in [*_NON_ASCII.finditer(text), None]:
            a, b = run.span() if run else (len(text), len(text))
            k_starts.extend(range(pos, a))
            k_ends.extend(range(pos + 1, a + 1))
            f_starts.extend(range(pos, a))
            f_ends.extend(range(pos + 1, a + 1))
            for i in range(a, b):
                k = len(_KEEP_CASE[ord(text[i])])
                f = len(_FOLD_CASE[ord(text[i])])
                k_starts.extend([i] * k)
                k_ends.extend([i + 1] * k)
                f_starts.extend([i] * f)
                f_ends.extend([i + 1] * f)
            pos = b
        # Both copies are built per character above, so these hold by construction.
        assert len(k_starts) == len(self.kept)
        assert len(f_starts) == len(self.folded)
        return k_starts, k_ends, f_starts, f_ends

    def number_runs(self) -> list[_NumberRun]:
        """Runs of digit groups in `kept` long enough for a numeric rule, not glued to a
        following word; shared by the numeric detectors."""
        if self._runs is None:
            t = self.kept
            runs = (
                _NumberRun(t, start, end)
                for start, end in (m.span() for m in _NUMBER_RUN.finditer(t))
                if end - start >= _MIN_RUN and not _glued_after(t, end)
            )
            self._runs = [run for run in runs if run.counts[-1] >= _MIN_RUN]
        return self._runs


# ------------------------------------------------------------------------ numeric helpers

# Digit groups joined by short runs of separators; possessive, so each run is maximal and
# the scan linear. A run glued to a word, a decimal or a larger number does not start.
# (Patterns here open with a character class or a literal and test what precedes it with a
# lookbehind placed after it: a leading lookbehind would stop `re` from skipping ahead to
# the possible starts, and costs ~0.1 us for every character of the text.)
_NUMBER_RUN = re.compile(
    r"[+(0-9](?<![\w.,+\-/](?s:.))(?:(?<=[+(])[0-9])?[0-9]*+(?:[ .\-/()]{1,3}+[0-9]++)*+"
)
_MIN_RUN = 7  # the fewest digits (so also characters) a numeric rule needs


class _NumberRun:
    """Digit groups and the separators between them; `counts[i]` = digits before group i."""

    __slots__ = ("counts", "groups", "lens", "paren", "plus", "seps", "start")

    def __init__(self, text: str, start: int, end: int) -> None:
        self.start = start
        self.plus = text[start] == "+"
        self.paren = text[start] == "("
        pos = start + 1 if self.plus or self.paren else start
        self.groups: list[Span] = []
        self.lens: list[int] = []
        self.seps: list[str] = []
        self.counts = [0]
        for digits, sep in _GROUPS.findall(text, pos, end):
            n = len(digits)
            self.groups.append((pos, pos + n))
            self.lens.append(n)
            self.seps.append(sep)
            self.counts.append(self.counts[-1] + n)
            pos += n + len(sep)
        self.seps.pop()  # a run ends with digits

    def digits(self, text: str, i: int, j: int) -> str:
        return "".join(text[s:e] for s, e in self.groups[i : j + 1])


_GROUPS = re.compile(r"([0-9]+)([^0-9]*)")


def _glued_after(text: str, end: int) -> bool:
    return end < len(text) and (text[end].isalnum() or text[end] == "_")


def _context(pattern: re.Pattern[str], text: str, start: int, width: int = 32) -> bool:
    return pattern.search(text, max(0, start - width), start) is not None


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        n = ord(ch) - 48
        if i % 2:
            n = n * 2 - 9 if n > 4 else n * 2
        total += n
    return total % 10 == 0


def _card_issuer_ok(d: str) -> bool:
    """Whether the number's prefix belongs to a card network that issues its length."""
    n = len(d)
    p2, p3, p4, p6 = int(d[:2]), int(d[:3]), int(d[:4]), int(d[:6])
    if d[0] == "4":
        return n in (13, 16, 19)  # Visa
    if 51 <= p2 <= 55 or 2221 <= p4 <= 2720:
        return n == 16  # Mastercard
    if p2 in (34, 37):
        return n == 15  # American Express
    if p4 == 6011 or 644 <= p3 <= 649 or p2 == 65 or 622126 <= p6 <= 622925:
        return 16 <= n <= 19  # Discover
    if 300 <= p3 <= 305 or p4 == 3095 or p2 in (36, 38, 39):
        return 14 <= n <= 19  # Diners Club
    if 3528 <= p4 <= 3589:
        return 16 <= n <= 19  # JCB
    if 2200 <= p4 <= 2204:
        return n == 16  # Mir
    if p2 in (62, 81):
        return 16 <= n <= 19  # UnionPay
    if p2 == 50 or 56 <= p2 <= 69:
        return 12 <= n <= 19  # Maestro
    return False


def _is_card(digits: str) -> bool:
    return 13 <= len(digits) <= 19 and _card_issuer_ok(digits) and _luhn(digits)


_VERHOEFF_D = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 2, 3, 4, 0, 6, 7, 8, 9, 5),
    (2, 3, 4, 0, 1, 7, 8, 9, 5, 6),
    (3, 4, 0, 1, 2, 8, 9, 5, 6, 7),
    (4, 0, 1, 2, 3, 9, 5, 6, 7, 8),
    (5, 9, 8, 7, 6, 0, 4, 3, 2, 1),
    (6, 5, 9, 8, 7, 1, 0, 4, 3, 2),
    (7, 6, 5, 9, 8, 2, 1, 0, 4, 3),
    (8, 7, 6, 5, 9, 3, 2, 1, 0, 4),
    (9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
)
_VERHOEFF_P = (
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9),
    (1, 5, 7, 6, 2, 8, 3, 0, 9, 4),
    (5, 8, 0, 3, 7, 9, 6, 1, 4, 2),
    (8, 9, 1, 6, 0, 4, 3, 5, 2, 7),
    (9, 4, 5, 3, 1, 2, 6, 8, 7, 0),
    (4, 2, 8, 6, 5, 7, 3, 9, 0, 1),
    (2, 7, 9, 3, 8, 0, 6, 4, 1, 5),
    (7, 0, 4, 6, 9, 1, 3, 2, 5, 8),
)


def _verhoeff(digits: str) -> bool:
    check = 0
    for i, ch in enumerate(reversed(digits)):
        check = _VERHOEFF_D[check][_VERHOEFF_P[i % 8][ord(ch) - 48]]
    return check == 0


Span = tuple[int, int]
_FindFn = Callable[[str, _Text], Iterable[Span]]


# ----------------------------------------------------------------------------- PII rules

# An email is found from its "@": the local part before it, the domain after it.
_EMAIL_LOCAL = re.compile(r"[A-Za-z0-9._%+\-]{1,64}$")
_EMAIL_DOMAIN = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,8}[A-Za-z]{2,24}(?![A-Za-z0-9\-])"
)
_LOCAL_CHARS = frozenset(string.ascii_letters + string.digits + "._%+-")


def _find_emails(t: str, _: _Text) -> Iterator[Span]:
    at = t.find("@")
    while at != -1:
        local = _EMAIL_LOCAL.search(t, max(0, at - 64), at)
        domain = _EMAIL_DOMAIN.match(t, at + 1)
        if local and domain:
            start = local.start()
            whole = start == 0 or t[start - 1] not in _LOCAL_CHARS
            while start < at and not t[start].isalnum():
                start += 1
            name = t[start:at]
            if name and whole and ".." not in name and not name.endswith("."):
                yield start, domain.end()
        at = t.find("@", at + 1)


def _find_cards(t: str, text: _Text) -> Iterator[Span]:
    """13 to 19 digits, alone or in groups of 3 or more joined by spaces or dashes,
    Luhn-valid, of a known issuer; at each group, the longest such window of the run."""
    for run in text.number_runs():
        counts, lens, n = run.counts, run.lens, len(run.groups)
        if counts[-1] < 13 or run.plus or run.paren:
            continue
        i = 0
        while i < n:
            best = None
            if t[run.groups[i][0]] in "234568":  # the first digits of every issuer
                for j in range(i, n):
                    if j > i and (run.seps[j - 1].strip(" -") or min(lens[j - 1], lens[j]) < 3):
                        break
                    count = counts[j + 1] - counts[i]
                    if count > 19:
                        break
                    if count >= 13 and _is_card(run.digits(t, i, j)):
                        best = j
            if best is None:
                i += 1
            else:
                yield run.groups[i][0], run.groups[best][1]
                i = best + 1


_PHONE_CONTEXT = re.compile(
    r"(?i)\b(?:phone|tel|mobile|mob|cell|call|fax|whatsapp|sms|text|contact|n[uú]mero|"
    r"telefon|ph)\b[^0-9\n]{0,16}$"
)
_PHONE_SEPS = frozenset((" ", "-", ".", "/"))
_MAX_PHONE_GROUPS = 6


def _find_phones(t: str, text: _Text) -> Iterator[Span]:
    for run in text.number_runs():
        i, n = 0, len(run.groups)
        if n == 3 and _is_date(run.lens):
            continue
        while i < n and run.counts[-1] - run.counts[i] >= 7:
            # A number starts a run or follows a change of separator (else it would be the
            # tail of a longer grouped number: an account, an IBAN).
            if 0 < i < n - 1 and run.seps[i - 1] == run.seps[i]:
                i += 1
                continue
            j = _phone_end(t, run, i)
            if j is None:
                i += 1
            else:
                yield (run.start if i == 0 else run.groups[i][0]), run.groups[j][1]
                i = j + 1


def _phone_end(t: str, run: _NumberRun, i: int) -> int | None:
    """The last group of the phone number that starts at group i of a run, if one does.

    Accepted: +CC and 7-14 more digits; (area) and the rest; a uniformly separated national
    number in a common shape (NANP 415-555-2671, trunk-0 020 7946 0958); any other plausible
    grouping right after a word like "phone" or "call". Never a date, a version or IP, an
    SSN or Aadhaar shape, a card number, nor the tail of a longer grouped number.
    """
    counts, seps, n = run.counts, run.seps, len(run.groups)
    last = min(n, i + _MAX_PHONE_GROUPS) - 1
    if i == 0 and run.plus:
        return next((j for j in range(last, -1, -1) if 8 <= counts[j + 1] <= 15), None)
    if i == 0 and run.paren and n > 1 and seps[0].startswith(")"):
        for j in range(last, 0, -1):
            if 9 <= counts[j + 1] <= 12 and all(sep in (" ", "-", ".") for sep in seps[1:j]):
                return j
        return None
    sep = seps[i] if i < n - 1 else None
    if sep in _PHONE_SEPS:
        end = i + 1
        while end < last and seps[end] == sep:
            end += 1
        for j in range(end, i, -1):
            if 7 <= counts[j + 1] - counts[i] <= 15 and _phone_shape(t, run, i, j, sep):
                return j
    if i == 0 and _context(_PHONE_CONTEXT, t, run.start):
        for j in range(last, -1, -1):
            if 7 <= counts[j + 1] <= 15 and _plausible_phone(t, run, 0, j):
                return j
    return None


def _is_date(lens: Sequence[int]) -> bool:
    """Whether three groups have the lengths of a date (2024-01-15, 15/01/2024, 1.2.2024)."""
    first, middle, last = lens
    return middle <= 2 and ((first == 4 and last <= 2) or (last == 4 and first <= 2))


def _plausible_phone(t: str, run: _NumberRun, i: int, j: int) -> bool:
    lens = tuple(run.lens[i : j + 1])
    if lens in ((3, 2, 4), (4, 4, 4)):
        return False  # SSN and Aadhaar shapes
    if len(lens) == 3 and _is_date(lens):
        return False
    if j - i >= 2 and all(sep == "." for sep in run.seps[i:j]) and max(lens) <= 3:
        return False  # an IP address or a version
    return run.counts[j + 1] - run.counts[i] < 13 or not _is_card(run.digits(t, i, j))


def _phone_shape(t: str, run: _NumberRun, i: int, j: int, sep: str) -> bool:
    """Whether uniformly separated groups i..j have the shape of a national number."""
    lens = tuple(run.lens[i : j + 1])
    first = t[run.groups[i][0]]
    if sep == "/":
        shaped = len(lens) == 2 and first == "0"  # 030/1234567
    elif lens[-3:] == (3, 3, 4):  # NANP: area code and exchange do not start with 0 or 1
        area, exchange = t[run.groups[j - 2][0]], t[run.groups[j - 1][0]]
        shaped = area not in "01" and exchange not in "01"
        shaped = shaped and (len(lens) == 3 or (len(lens) == 4 and lens[0] == 1 and first == "1"))
    else:  # a national number with its trunk 0 (020 7946 0958, 06 12 34 56 78)
        count = run.counts[j + 1] - run.counts[i]
        shaped = (
            first == "0"
            and 9 <= count <= 12
            and min(lens) >= 2
            and (sep != "." or set(lens) == {2})
        )
    return shaped and _plausible_phone(t, run, i, j)


_SSN_CONTEXT = re.compile(r"(?i)\b(?:ssn|social security(?: number| no)?)\W{0,4}$")
_AADHAAR_CONTEXT = re.compile(r"(?i)\b(?:aadhaa?r|uidai|uid)(?: (?:number|no))?\W{0,4}$")


def _ssn_ok(d: str) -> bool:
    area, group, serial = d[:3], d[3:5], d[5:]
    return (
        area not in ("000", "666")
        and area[0] != "9"
        and group != "00"
        and serial != "0000"
        and d not in ("078051120", "219099999")  # numbers once printed in advertising
    )


def _alone(run: _NumberRun, i: int, j: int) -> bool:
    """Whether groups i..j are not just part of a longer number grouped the same way."""
    sep = run.seps[i]
    return (i == 0 or run.seps[i - 1] != sep) and (j + 1 == len(run.groups) or run.seps[j] != sep)


def _find_ssns(t: str, text: _Text) -> Iterator[Span]:
    for run in text.number_runs():
        if run.plus or run.paren or run.counts[-1] < 9:
            continue
        n = len(run.groups)
        for i in range(n):
            if run.lens[i : i + 3] == [3, 2, 4] and run.seps[i] == run.seps[i + 1]:
                ok = run.seps[i] in ("-", " ") and _alone(run, i, i + 2)
                if ok and _ssn_ok(run.digits(t, i, i + 2)):
                    yield run.groups[i][0], run.groups[i + 2][1]
            elif (
                n == 1
                and run.lens[0] == 9
                and _context(_SSN_CONTEXT, t, run.start)
                and _ssn_ok(run.digits(t, 0, 0))
            ):
                yield run.groups[0]


def _find_aadhaar(t: str, text: _Text) -> Iterator[Span]:
    for run in text.number_runs():
        if run.plus or run.paren or run.counts[-1] < 12:
            continue
        n = len(run.groups)
        for i in range(n):
            if run.lens[i : i + 3] == [4, 4, 4] and run.seps[i] == run.seps[i + 1]:
                if run.seps[i] not in (" ", "-") or not _alone(run, i, i + 2):
                    continue
                d = run.digits(t, i, i + 2)
            elif n == 1 and run.lens[0] == 12 and _context(_AADHAAR_CONTEXT, t, run.start):
                d = run.digits(t, 0, 0)
            else:
                continue
            if d[0] not in "01" and _verhoeff(d):
                yield run.groups[i][0], run.groups[min(i + 2, n - 1)][1]


# Lengths of the IBAN of each country (SEPA and the other common ones).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28, "EE": 20,
    "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18,
    "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IS": 26, "IT": 27, "JO": 30,
    "KW": 30, "KZ": 20, "LB": 28, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "MC": 27, "MD": 24,
    "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18, "NO": 15, "PK": 24, "PL": 28,
    "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip

_IBAN = re.compile(r"[A-Z](?<![A-Za-z0-9](?s:.))[A-Z][0-9]{2}(?:[ \-]?[A-Z0-9]){11,30}+")


def _iban_end(t: str, m: re.Match[str]) -> int | None:
    """Where the IBAN starting the candidate ends (its country fixes its length), if valid.

    The candidate may run on into the next words; only the country's length counts.
    """
    length = _IBAN_LENGTHS.get(m.group()[:2])
    if length is None:
        return None
    chars: list[str] = []
    pos = m.start()
    while len(chars) < length and pos < m.end():
        if t[pos].isalnum():
            chars.append(t[pos])
        pos += 1
    if len(chars) < length or _glued_after(t, pos):
        return None
    iban = "".join(chars)
    rearranged = iban[4:] + iban[:4]
    return pos if int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1 else None


def _find_ibans(t: str, _: _Text) -> Iterator[Span]:
    pos = 0
    while (m := _IBAN.search(t, pos)) is not None:
        end = _iban_end(t, m)
        if end is None:
            pos = m.start() + 1  # the candidate may have swallowed the start of the next one
        else:
            yield m.start(), end
            pos = end


_NINO = re.compile(
    r"([A-Z](?<![A-Za-z0-9](?s:.))[A-Z]) ?[0-9]{2} ?[0-9]{2} ?[0-9]{2} ?[A-D](?![A-Za-z0-9])"
)
_NINO_BAD_PREFIXES = frozenset({"BG", "GB", "KN", "NK", "NT", "TN", "ZZ"})


def _find_ninos(t: str, _: _Text) -> Iterator[Span]:
    for m in _NINO.finditer(t):
        prefix = m.group(1)
        if (
            prefix[0] not in "DFIQUV"
            and prefix[1] not in "DFIOQUV"
            and prefix not in _NINO_BAD_PREFIXES
        ):
            yield m.span()


_DNI = re.compile(
    r"[XYZ0-9](?<![A-Za-z0-9](?s:.))(?:(?<=[XYZ])[ \-]?[0-9]{7}|(?<=[0-9])[0-9]{7})"
    r"[ \-]?([A-Za-z])(?![A-Za-z0-9])"
)
_DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def _find_dnis(t: str, _: _Text) -> Iterator[Span]:
    for m in _DNI.finditer(t):
        head, letter = m.group()[0], m.group(1)
        digits = "".join(c for c in m.group()[:-1] if c.isdigit())
        number = str("XYZ".index(head)) + digits if head in "XYZ" else digits
        if _DNI_LETTERS[int(number) % 23] == letter.upper():
            yield m.span()


# -------------------------------------------------------------------------- secret rules

_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def _isolated(t: str, start: int, end: int) -> bool:
    return (start == 0 or t[start - 1] not in _TOKEN_CHARS) and (
        end == len(t) or t[end] not in _TOKEN_CHARS
    )


def _random_looking(body: str, mixed: bool = False) -> bool:
    """Not a placeholder like `xxxx...`; with `mixed`, also has upper, lower and digits."""
    if len(set(body)) < 6:
        return False
    if mixed:
        return (
            any(c.isupper() for c in body)
            and any(c.islower() for c in body)
            and any(c.isdigit() for c in body)
        )
    return True


def _token_rule(pattern: str, body_group: int = 0, mixed: bool = False) -> _FindFn:
    """A secret with a known prefix: isolated from other token characters, random-looking."""
    compiled = re.compile(pattern)

    def find(t: str, _: _Text) -> Iterator[Span]:
        for m in compiled.finditer(t):
            start, end = m.span()
            if _isolated(t, start, end) and _random_looking(m.group(body_group), mixed):
                yield start, end

    return find


_PEM_BEGIN = re.compile(r"-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----")
_PEM_END = re.compile(r"-----END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----")
_PEM_BODY = re.compile(r"(?:[ \t]*\r?\n[ \t]*[A-Za-z0-9+/=]{16,}+)*+")
_PEM_MAX_BLOCK = 20_000


def _find_private_keys(t: str, _: _Text) -> Iterator[Span]:
    """The whole block when its END line follows (within a key's size), else the header and
    the base64 lines after it."""
    pos = 0
    closing: re.Match[str] | None = None
    searched = False  # `closing` is the first END after the last search's start (or None)
    while (m := _PEM_BEGIN.search(t, pos)) is not None:
        if not searched or (closing is not None and closing.start() < m.end()):
            closing = _PEM_END.search(t, m.end())  # so each stretch is searched once
            searched = True
        if closing is not None and closing.start() - m.end() <= _PEM_MAX_BLOCK:
            end = closing.end()
        else:
            body = _PEM_BODY.match(t, m.end())
            end = body.end() if body else m.end()
        yield m.start(), end
        pos = end


# The whole dotted token, possessively, so a run of "eyJ..." is read once; its parts are
# checked after: header.payload.signature (the signature may be empty: alg "none").
_JWT = re.compile(r"eyJ[A-Za-z0-9_\-.]*+")


def _find_jwts(t: str, _: _Text) -> Iterator[Span]:
    for m in _JWT.finditer(t):
        token = m.group()
        if token.count(".") == 3 and token.endswith("."):
            token = token[:-1]  # the full stop after the token
        header, *rest = token.split(".")
        if len(rest) != 2 or len(header) < 10 or len(rest[0]) < 8:
            continue
        start, end = m.start(), m.start() + len(token)
        if not _isolated(t, start, end):
            continue
        try:
            decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
        except (binascii.Error, ValueError):
            continue
        if isinstance(decoded, dict) and isinstance(decoded.get("alg"), str):
            yield start, end


# A token is only taken for a secret right after one of these words (the start of a word
# or identifier: `key`, `api_key`, `AWS_SECRET_ACCESS_KEY`, `secretKey`, `password1`).
_SECRET_WORDS = (
    "key", "apikey", "accesskey", "privatekey", "secret", "token", "passw", "pwd", "bearer",
    "auth", "credential",
)  # fmt: skip
_AFTER_SECRET_WORD = re.compile(
    r"[A-Za-z0-9_\-]{0,24}?[\"']?(?:[ \t]*[:=][ \t]*|[ \t]+)[\"']?"
    r"(?P<tok>[A-Za-z0-9+/=_\-]{24,4096}+)"
)
_HEX = re.compile(r"[0-9a-fA-F]+")
_B64_CHARS = frozenset(_TOKEN_CHARS | set("+/="))


def _entropy(s: str) -> float:
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values())


def _random_token(token: str) -> bool:
    bare = token.rstrip("=").replace("-", "")
    if len(bare) >= 24 and _HEX.fullmatch(bare):
        return _entropy(bare) >= 3.0
    return (
        _entropy(token) >= 4.0
        and any(c.isdigit() for c in token)
        and any(c.isalpha() for c in token)
    )


def _find_high_entropy(t: str, _: _Text) -> Iterator[Span]:
    lowered = t.lower()
    if len(lowered) != len(t):  # a character whose lowercase is longer: compare as is
        lowered = t
    starts = []
    for word in _SECRET_WORDS:
        at = lowered.find(word)
        while at != -1:
            if at == 0 or not t[at - 1].isalpha():
                starts.append((at, at + len(word)))
            at = lowered.find(word, at + 1)
    read = 0  # a token already read is not read again from a word inside it (linear time)
    for at, after in sorted(starts):
        if at < read:
            continue
        m = _AFTER_SECRET_WORD.match(t, after)
        if m is None:
            continue
        start, end = m.span("tok")
        read = end
        glued = end < len(t) and t[end] in _B64_CHARS
        if not glued and _random_token(m.group("tok")):
            yield start, end


# ----------------------------------------------------------------------- injection rules

_SEP = r"[\W_]{1,8}+"
_NEGATED = re.compile(r"\b(?:don\W?t|do not|never|dont)\W*$")


_Phrase = str | tuple[str, tuple[str, ...]]


def _phrase_rule(*patterns: _Phrase, negatable: bool = False) -> _FindFn:
    """Phrases matched on the casefolded text; in a pattern a space stands for any short
    run of spaces or punctuation. A pattern given as (pattern, words) only runs when one of
    the words occurs in the text (a pattern that opens with an alternation makes `re` try
    every position, ~15 us per 2 KB; one that opens with a word is searched for quickly).
    The word boundary before a phrase is checked on each match. With `negatable`, a phrase
    right after "don't", "do not" or "never" does not count."""
    compiled = [
        (re.compile(p.replace(" ", _SEP)), ()) if isinstance(p, str)
        else (re.compile(p[0].replace(" ", _SEP)), p[1])
        for p in patterns
    ]  # fmt: skip

    def find(t: str, _: _Text) -> list[Span]:
        spans = []
        for pattern, words in compiled:
            if words and not _has_word(t, words):
                continue
            for m in pattern.finditer(t):
                start = m.start()
                if start and (t[start - 1].isalnum() or t[start - 1] == "_"):
                    continue
                if negatable and _context(_NEGATED, t, start, 12):
                    continue
                spans.append(m.span())
        return _disjoint(spans)

    return find


def _has_word(t: str, words: tuple[str, ...]) -> bool:
    """Whether one of the words occurs in the text as a whole word."""
    for word in words:
        at = t.find(word)
        while at != -1:
            end = at + len(word)
            if (at == 0 or not t[at - 1].isalnum()) and (end == len(t) or not t[end].isalnum()):
                return True
            at = t.find(word, at + 1)
    return False


def _disjoint(spans: list[Span]) -> list[Span]:
    """The spans in order, without those overlapping an earlier (or longer) one."""
    kept: list[Span] = []
    for start, end in sorted(spans, key=lambda s: (s[0], -s[1])):
        if not kept or start >= kept[-1][1]:
            kept.append((start, end))
    return kept


_IGNORE_VERB = r"(?:ignore|disregard|forget|skip|overlook|override|bypass|neglect|abandon|drop)"
_DETERMINER = r"(?:all|any|every|each|the|your|my|of|these|those|such|that|this)"
_EARLIER = (
    r"(?:previous|previously|prior|above|earlier|preceding|former|foregoing|original|initial|"
    r"old|system|existing|given|provided)"
)
_INSTRUCTIONS = (
    r"(?:instructions?|rules?|prompts?|directions?|directives?|guidelines?|commands?|"
    r"constraints?|guidance|restrictions?|orders?|context|programming)"
)
_EARLIER_WORDS = (
    "previous", "prior", "above", "earlier", "preceding", "former", "foregoing", "original",
    "initial", "old", "system", "existing", "given", "provided", "previously",
)  # fmt: skip
_find_ignore = _phrase_rule(
    (
        rf"{_IGNORE_VERB} (?:{_DETERMINER} ){{0,3}}{_EARLIER} (?:{_DETERMINER} ){{0,2}}"
        rf"{_INSTRUCTIONS}\b",
        _EARLIER_WORDS,
    ),
    (
        rf"{_IGNORE_VERB} (?:(?:all|any) (?:of )?(?:(?:the|your|my|these|those) )?|"
        rf"(?:your|my) ){_INSTRUCTIONS}\b",
        ("all", "any", "your", "my"),
    ),
    (
        rf"{_IGNORE_VERB} (?:(?:all|any) )?(?:of )?(?:everything|anything|all|what) "
        r"(?:(?:(?:that )?(?:you|i|we) (?:were|was|have been|ve been|ve) (?:told|given|said|"
        r"written)|(?:that )?(?:was|were|has been|have been) (?:said|written|given|told|"
        r"stated)|written|said|stated|given) (?:above|before|previously|earlier|so far|until "
        r"now)|above|previously|earlier|so far|until now|before (?:this|now|here))\b",
        ("above", "before", "previously", "earlier", "far", "now"),
    ),
    negatable=True,
)
_PERSONA = r"(?:dan|stan|dude|aim|jailbroken|unrestricted|unfiltered|uncensored|evil)"
_PERSONA_WORDS = ("dan", "stan", "dude", "aim", "jailbroken", "unrestricted", "unfiltered",
                  "uncensored", "evil")  # fmt: skip
_find_role = _phrase_rule(
    r"you (?:are|re) now (?:dan|stan|dude|free|unrestricted|unfiltered|uncensored|unbound|"
    r"jailbroken|evil|no longer|acting|in (?:developer|dan|god|jailbreak|unrestricted|debug) "
    r"mode|going to (?:act|pretend|be|roleplay|play)|(?:an? )?(?:unrestricted|unfiltered|"
    r"uncensored|unbound|evil|rogue|different|new|jailbroken) (?:ai|assistant|model|chatbot|"
    r"bot|persona|character|version|entity|llm))\b",
    (
        rf"(?:act|acting|behave|pretend|roleplay|role play|respond|answer) (?:as|like|to be) "
        rf"(?:an? )?{_PERSONA}\b",
        _PERSONA_WORDS,
    ),
    (
        r"(?:dan|developer|god|jailbreak|jailbroken|unrestricted) mode (?:enabled|activated|"
        r"engaged)\b",
        ("enabled", "activated", "engaged"),
    ),
    (
        r"(?:enable|activate|enter|switch to|turn on|unlock) (?:(?:your|the) )?(?:dan|god|"
        r"jailbreak|unrestricted) mode\b",
        ("mode",),
    ),
    (r"(?:enable|activate|enter|switch to|turn on|unlock) your developer mode\b", ("mode",)),
    (
        r"(?:act|respond|reply|answer|operate|stay|remain|you are|you re) in (?:developer|dan|"
        r"god|jailbreak) mode\b",
        ("mode",),
    ),
    r"do anything now\b",
    r"dan mode\b",
    r"jailbreak (?:mode|prompt|enabled|activated)\b",
    r"you (?:are|re) (?:now )?jailbroken\b",
    r"pretend (?:that )?you (?:are|have) (?:no|zero) (?:restrictions|rules|limits|"
    r"limitations|filters|guidelines|boundaries)\b",
)
_LEAK_VERB = (
    r"(?:reveal|print|show|display|output|repeat|recite|tell|give|share|disclose|leak|dump|"
    r"expose|write out|list|echo|spell out|paste|provide|return|what is|what are|what were|"
    r"what was|what s)"
)
_YOUR_INSTRUCTIONS = (
    "prompt", "instructions", "rules", "guidelines", "directives", "programming", "configuration",
)  # fmt: skip
_find_leak = _phrase_rule(
    (
        rf"{_LEAK_VERB} (?:(?:me|us|out|back|all|of|the|your|ur|its|full|entire|exact|"
        r"complete|verbatim|original|initial|whole|current) ){0,5}(?:system (?:prompt|message|"
        r"instructions?)|hidden (?:prompt|instructions?|rules)|(?:initial|original|secret|"
        r"internal|developer|confidential) (?:prompt|instructions?)|pre\W{0,3}prompt)\b",
        ("prompt", "preprompt", "message", "instruction", "instructions", "rules"),
    ),
    (
        rf"{_LEAK_VERB} (?:(?:me|us|out|back|all|of) ){{0,3}}(?:your|ur) (?:(?:full|entire|"
        r"exact|complete|original|initial|hidden|secret|internal|verbatim|whole|current) ){0,2}"
        r"(?:prompt|instructions|rules|guidelines|directives|programming|configuration)\b",
        _YOUR_INSTRUCTIONS,
    ),
    (
        r"(?:repeat|print|output|recite) (?:(?:all|the|every) ){0,2}(?:words|text|everything|"
        r"lines|content) (?:above|before this|so far)\b",
        ("above", "before", "far"),
    ),
)
_ROLE_TOKEN = re.compile(
    r"<\|\s*(?:im_start|im_end|im_sep|system|assistant|user|endoftext|start_header_id|"
    r"end_header_id|eot_id|begin_of_text|end_of_text)\s*\|>"
    r"|\[/?inst\]|<</?sys>>|<(?:start|end)_of_turn>|</?(?:system|system_prompt|sys)>"
)
# A markdown heading that fakes a turn: "### System:" alone at the start of a line.
_ROLE_HEADING = re.compile(
    r"###{0,4}[ \t]*(?:system|assistant|instructions?|developer|new instructions)"
    r"(?:[ \t]+(?:prompt|message))?[ \t]*:"
)


_ROLE_TOKEN_WORDS = ("<|", "inst]", "sys>", "system>", "system_prompt>", "_of_turn>")


def _find_delimiters(t: str, _: _Text) -> list[Span]:
    spans = []
    if any(w in t for w in _ROLE_TOKEN_WORDS):
        spans = [m.span() for m in _ROLE_TOKEN.finditer(t)]
    for m in _ROLE_HEADING.finditer(t):
        start = m.start()
        while start and t[start - 1] in " \t>":
            start -= 1
        if start == 0 or t[start - 1] == "\n":  # the heading starts its line
            spans.append(m.span())
    return _disjoint(spans)


# ------------------------------------------------------------------------------ registry


@dataclass(frozen=True, slots=True)
class _Detector:
    rule: str
    folded: bool
    """Matched on the casefolded copy (word rules) rather than the case-kept one."""
    needles: tuple[str, ...]
    """One of these must occur in the text for the detector to run (a cheap prefilter)."""
    find: _FindFn


_ANY_DIGIT = tuple("0123456789")
_DETECTORS: dict[str, _Detector] = {
    d.rule: d
    for d in (
        _Detector("secret.private_key", False, ("PRIVATE KEY",), _find_private_keys),
        _Detector(
            "secret.aws_access_key",
            False,
            ("AKIA", "ASIA", "ABIA", "ACCA"),
            _token_rule(r"(?:AKIA|ASIA|ABIA|ACCA)([A-Z0-9]{16})", 1),
        ),
        _Detector(
            "secret.github_token",
            False,
            ("ghp_", "gho_", "ghs_", "ghu_", "ghr_", "github_pat_"),
            _token_rule(r"gh[pousr]_([A-Za-z0-9]{36,255}+)|github_pat_([A-Za-z0-9_]{22,255}+)"),
        ),
        _Detector(
            "secret.slack_token",
            False,
            ("xox",),
            _token_rule(r"xox[abprs]-([A-Za-z0-9\-]{10,250}+)", 1),
        ),
        _Detector(
            "secret.anthropic_key",
            False,
            ("sk-ant-",),
            _token_rule(r"sk-ant-([A-Za-z0-9_\-]{20,250}+)", 1, mixed=True),
        ),
        _Detector(
            "secret.strata_key",
            False,
            ("sk-strata-",),
            _token_rule(r"sk-strata-([A-Za-z0-9_\-]{43})", 1),
        ),
        _Detector(
            "secret.openai_key",
            False,
            ("sk-",),
            _token_rule(
                r"sk-(?!ant-|strata-)(?:proj-|svcacct-|admin-)?([A-Za-z0-9_\-]{20,250}+)",
                1,
                mixed=True,
            ),
        ),
        _Detector(
            "secret.google_api_key",
            False,
            ("AIza",),
            _token_rule(r"AIza([0-9A-Za-z_\-]{35})", 1),
        ),
        _Detector("secret.jwt", False, ("eyJ",), _find_jwts),
        _Detector("secret.high_entropy", False, (), _find_high_entropy),
        _Detector("pii.email", False, ("@",), _find_emails),
        _Detector("pii.credit_card", False, _ANY_DIGIT, _find_cards),
        _Detector("pii.iban", False, _ANY_DIGIT, _find_ibans),
        _Detector("pii.us_ssn", False, _ANY_DIGIT, _find_ssns),
        _Detector("pii.uk_nino", False, _ANY_DIGIT, _find_ninos),
        _Detector("pii.es_dni", False, _ANY_DIGIT, _find_dnis),
        _Detector("pii.in_aadhaar", False, _ANY_DIGIT, _find_aadhaar),
        _Detector("pii.phone", False, _ANY_DIGIT, _find_phones),
        _Detector(
            "injection.ignore_instructions",
            True,
            (
                "ignor",
                "disregard",
                "forget",
                "skip",
                "overlook",
                "overrid",
                "bypass",
                "neglect",
                "abandon",
                "drop",
            ),
            _find_ignore,
        ),
        _Detector(
            "injection.role_override",
            True,
            ("you", "mode", "anything", "act", "behav", "pretend", "role", "respond", "answer"),
            _find_role,
        ),
        _Detector(
            "injection.system_prompt_leak",
            True,
            (
                "prompt",
                "instruction",
                "rules",
                "guideline",
                "directive",
                "programming",
                "configuration",
                "above",
                "so far",
                "before",
            ),
            _find_leak,
        ),
        _Detector("injection.delimiter", True, ("<", "[", "#"), _find_delimiters),
    )
}

RULE_IDS: tuple[str, ...] = tuple(sorted(_DETECTORS))
"""Every detector rule a profile can name (deny and limit rules come from their own fields)."""
RULE_FAMILIES: tuple[str, ...] = ("injection", "pii", "secret")
"""The prefixes a profile can name to set every rule of a family at once."""


# --------------------------------------------------------------------------- deny terms

_DENY_SEP = r"[\W_]{1,8}"
_Trie = dict[str, "_Trie"]


def _deny_key(term: str) -> str:
    return " ".join(_Text(term).folded.split())


def _deny_pattern(terms: Iterable[str]) -> re.Pattern[str]:
    """One regex for many terms: a trie, so each position is tried against one branch per
    first character, whole words only, and longer terms win over their prefixes."""
    root: _Trie = {}
    for term in terms:
        node = root
        for ch in term:
            node = node.setdefault(ch, {})
        node[""] = {}

    def emit(node: _Trie, last: str) -> str:
        alts = [
            (_DENY_SEP if ch == " " else re.escape(ch)) + emit(child, ch)
            for ch, child in sorted(node.items())
            if ch
        ]
        if "" in node:
            alts.append(r"(?!\w)" if _is_word(last) else "")
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    # Each branch opens with its first character (so `re` can skip to where one occurs);
    # the word boundary before a term is a lookbehind right after that character.
    return re.compile(
        "|".join(
            re.escape(ch) + (r"(?<!\w(?s:.))" if _is_word(ch) else "") + emit(child, ch)
            for ch, child in sorted(root.items())
        )
    )


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


# ------------------------------------------------------------------------------ profiles


class GuardrailProfile(BaseModel):
    """Which rules run and what each does."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    """Filled from the profile's key."""
    rules: dict[str, Action] = Field(default_factory=dict)
    """Rule id or family (`pii`, `secret`, `injection`) -> action; the most specific key
    wins; a rule no key covers is off."""
    deny_terms: list[str] = Field(default_factory=list)
    """Words and phrases matched whole, case- and accent-insensitively (rule `deny.term`)."""
    deny_topics: dict[str, list[str]] = Field(default_factory=dict)
    """Topic -> its terms, matched like deny_terms (rule `deny.topic.<topic>`)."""
    deny_action: Action = Action.BLOCK
    """The action of every deny rule."""
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """Requests whose estimated prompt is larger are blocked (`limit.prompt_tokens`)."""
    output_rules: dict[str, Action] | None = None
    """Rules for the model's answer; None means the same as `rules`."""

    @field_validator("rules", "output_rules")
    @classmethod
    def _known_rules(cls, value: dict[str, Action] | None) -> dict[str, Action] | None:
        for key in value or {}:
            if key not in _DETECTORS and key not in RULE_FAMILIES:
                raise ValueError(f"unknown rule {key!r}; known: {', '.join(RULE_IDS)}")
        return value

    @field_validator("deny_terms")
    @classmethod
    def _terms(cls, value: list[str]) -> list[str]:
        for term in value:
            if not _deny_key(term):
                raise ValueError(f"deny term {term!r} is empty after normalisation")
        return value

    @field_validator("deny_topics")
    @classmethod
    def _topics(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        for topic, terms in value.items():
            if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]{0,62}", topic):
                raise ValueError(f"topic {topic!r} must match [a-z0-9][a-z0-9_-]*")
            if not terms or not all(_deny_key(t) for t in terms):
                raise ValueError(f"topic {topic!r} needs non-empty terms")
        return value


class GuardrailsFile(BaseModel):
    """The whole guardrails file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str
    """The profile of requests that name none."""
    profiles: dict[str, GuardrailProfile]


_Checks = tuple[tuple[_Detector, Action], ...]
# Rules whose validators are the weakest of their family: dropped when a stronger one of
# the family covers the same characters.
_WEAK_RULES = {"secret.high_entropy": "secret.", "pii.phone": "pii."}


def _resolve(rules: Mapping[str, Action]) -> _Checks:
    checks = []
    for rule, detector in _DETECTORS.items():
        action = rules.get(rule) or rules.get(rule.partition(".")[0])
        if action is not None:
            checks.append((detector, action))
    return tuple(checks)


@dataclass(frozen=True, slots=True)
class _DenyRule:
    rule: str
    pattern: re.Pattern[str]
    first_words: frozenset[str]
    """The first word of each term: a text with none of them needs no scan."""

    @classmethod
    def build(cls, rule: str, terms: Iterable[str]) -> _DenyRule:
        keys = {_deny_key(t) for t in terms}
        first = {words[0] for words in (_WORD.findall(k) for k in keys) if words}
        return cls(rule, _deny_pattern(keys), frozenset(first))


_WORD = re.compile(r"[^\W_]+")
_Deny = tuple[_DenyRule, ...]


@dataclass(frozen=True, slots=True)
class _Plan:
    """A profile compiled for checking: its detectors with their actions, its deny rules."""

    inputs: _Checks
    outputs: _Checks
    deny: _Deny
    deny_action: Action
    max_prompt_tokens: int | None

    @classmethod
    def build(cls, profile: GuardrailProfile) -> _Plan:
        deny = []
        if profile.deny_terms:
            deny.append(_DenyRule.build("deny.term", profile.deny_terms))
        for topic, terms in profile.deny_topics.items():
            deny.append(_DenyRule.build(f"deny.topic.{topic}", terms))
        output_rules = profile.rules if profile.output_rules is None else profile.output_rules
        return cls(
            inputs=_resolve(profile.rules),
            outputs=_resolve(output_rules),
            deny=tuple(deny),
            deny_action=profile.deny_action,
            max_prompt_tokens=profile.max_prompt_tokens,
        )


def _scan(
    text: str,
    index: int,
    checks: _Checks,
    deny: _Deny,
    deny_action: Action,
    offset: int = 0,
) -> list[Finding]:
    """The findings in one text, ordered by span, with spans of the original text."""
    norm = _Text(text)
    found: list[Finding] = []
    for detector, action in checks:
        t = norm.folded if detector.folded else norm.kept
        if detector.needles and not any(n in t for n in detector.needles):
            continue
        for start, end in detector.find(t, norm):
            start, end = norm.original_span(detector.folded, start, end)
            found.append(Finding(detector.rule, action, index, start + offset, end + offset))
    if deny:
        words = set(_WORD.findall(norm.folded))
        for rule in deny:
            if rule.first_words and rule.first_words.isdisjoint(words):
                continue
            for m in rule.pattern.finditer(norm.folded):
                start, end = norm.original_span(True, *m.span())
                found.append(Finding(rule.rule, deny_action, index, start + offset, end + offset))
    if len(found) > 1:
        found = _drop_shadowed(found)
        found.sort(key=lambda f: (f.start, f.end, f.rule))
    return found


def _drop_shadowed(found: list[Finding]) -> list[Finding]:
    """Without the findings of weak rules that overlap a stronger rule's of their family,
    e.g. a keyword before a known secret (OPENAI_API_KEY=sk-...) or digits in an IBAN."""
    weak = [f for f in found if f.rule in _WEAK_RULES]
    if not weak:
        return found
    strong: dict[str, list[Span]] = {}
    for f in found:
        if f.rule not in _WEAK_RULES:
            strong.setdefault(f.rule.partition(".")[0] + ".", []).append((f.start, f.end))
    covered = {family: _merged(spans) for family, spans in strong.items()}
    shadowed = set()
    for f in weak:
        spans = covered.get(_WEAK_RULES[f.rule], [])
        k = bisect.bisect_left(spans, (f.end,)) - 1  # the last span starting before f ends
        if k >= 0 and spans[k][1] > f.start:
            shadowed.add(id(f))
    return [f for f in found if id(f) not in shadowed]


def _merged(spans: list[Span]) -> list[Span]:
    out: list[Span] = []
    for start, end in sorted(spans):
        if out and start < out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _redact(texts: Sequence[str], findings: Iterable[Finding]) -> tuple[str, ...] | None:
    spans: dict[int, list[Finding]] = {}
    for f in findings:
        if f.action is Action.REDACT and f.start >= 0:
            spans.setdefault(f.text_index, []).append(f)
    if not spans:
        return None
    out = list(texts)
    for index, found in spans.items():
        text = texts[index]
        parts: list[str] = []
        pos = 0
        for f in sorted(found, key=lambda f: (f.start, -f.end)):
            if f.start < pos:  # overlaps the previous span: already covered, extend it
                if f.end > pos:
                    pos = f.end
                continue
            parts.append(text[pos : f.start])
            parts.append(f"[REDACTED:{f.rule.rsplit('.', 1)[-1].upper()}]")
            pos = f.end
        parts.append(text[pos:])
        out[index] = "".join(parts)
    return tuple(out)


# ------------------------------------------------------------------------------- engine


class Guardrails:
    """The profiles, compiled once; checks prompts and answers against one of them."""

    def __init__(self, profiles: Mapping[str, GuardrailProfile], default_profile: str) -> None:
        if default_profile not in profiles:
            raise ValueError(f"default guardrail profile {default_profile!r} is not defined")
        self._default = default_profile
        self._profiles = {
            name: p if p.name == name else p.model_copy(update={"name": name})
            for name, p in profiles.items()
        }
        self._plans = {name: _Plan.build(p) for name, p in self._profiles.items()}

    @classmethod
    def from_file(cls, path: Path) -> Guardrails:
        """Reads a guardrails file; raises ConfigError naming the file when it is invalid."""
        try:
            raw = yaml.safe_load(path.read_text())
            if raw is None:
                raise ValueError("the file is empty")
            parsed = GuardrailsFile.model_validate(raw)
            return cls(parsed.profiles, parsed.default)
        except (OSError, UnicodeDecodeError, yaml.YAMLError, ValidationError, ValueError) as err:
            raise ConfigError(f"invalid guardrails file {path}: {err}") from err

    @property
    def default_profile(self) -> str:
        """The name of the profile used when a request names none."""
        return self._default

    def profile(self, name: str | None) -> GuardrailProfile:
        """A profile by name; None or "" is the default; KeyError when unknown."""
        return self._profiles[self._name(name)]

    def _name(self, name: str | None) -> str:
        name = name or self._default
        if name not in self._profiles:
            raise KeyError(f"unknown guardrail profile {name!r}")
        return name

    def check_input(
        self, texts: Sequence[str], profile: str | None = None, estimated_tokens: int = 0
    ) -> Verdict:
        """Checks a request's texts (e.g. its messages) and its estimated prompt size."""
        if isinstance(texts, str):
            raise TypeError("check_input takes a sequence of texts, not one string")
        plan = self._plans[self._name(profile)]
        findings: list[Finding] = []
        if plan.max_prompt_tokens is not None and estimated_tokens > plan.max_prompt_tokens:
            findings.append(Finding("limit.prompt_tokens", Action.BLOCK, -1, -1, -1))
        for index, text in enumerate(texts):
            findings.extend(_scan(text, index, plan.inputs, plan.deny, plan.deny_action))
        return Verdict(tuple(findings), _redact(texts, findings))

    def check_output(self, text: str, profile: str | None = None) -> Verdict:
        """Checks a whole answer with the profile's output rules."""
        plan = self._plans[self._name(profile)]
        findings = _scan(text, 0, plan.outputs, plan.deny, plan.deny_action)
        return Verdict(tuple(findings), _redact((text,), findings))

    async def acheck_input(
        self, texts: Sequence[str], profile: str | None = None, estimated_tokens: int = 0
    ) -> Verdict:
        """`check_input` for a caller on an event loop: texts longer than INLINE_SCAN_CHARS
        together are scanned in a worker thread (see there)."""
        if sum(len(t) for t in texts) <= INLINE_SCAN_CHARS:
            return self.check_input(texts, profile, estimated_tokens)
        return await asyncio.to_thread(self.check_input, texts, profile, estimated_tokens)

    async def acheck_output(self, text: str, profile: str | None = None) -> Verdict:
        """`check_output` for a caller on an event loop (see `acheck_input`)."""
        if len(text) <= INLINE_SCAN_CHARS:
            return self.check_output(text, profile)
        return await asyncio.to_thread(self.check_output, text, profile)

    def output_scanner(self, profile: str | None = None) -> OutputScanner:
        """A scanner that cuts a streamed answer as soon as a blocking rule fires."""
        return OutputScanner(self._plans[self._name(profile)])


class OutputScanner:
    """Checks a streamed answer incrementally, for the profile's blocking output rules.

    Each delta is scanned together with the last `WINDOW` characters before it, so a
    secret split across deltas is still found, and the work per delta stays bounded: the
    whole stream costs time linear in its length. Once a rule blocks, the scanner keeps
    returning that finding.
    """

    WINDOW = 512

    def __init__(self, plan: _Plan) -> None:
        self._checks = tuple((d, a) for d, a in plan.outputs if a is Action.BLOCK)
        self._deny = plan.deny if plan.deny_action is Action.BLOCK else ()
        self._tail = ""
        self._length = 0
        self._finding: Finding | None = None
        self.scanned_chars = 0
        """Characters scanned so far (for tests of the linear cost)."""

    @property
    def blocking(self) -> Finding | None:
        """The finding that cut the answer, if one did."""
        return self._finding

    def feed(self, delta: str) -> Finding | None:
        """Adds the next piece of the answer; the first blocking finding once there is one."""
        if self._finding is not None or not delta:
            return self._finding
        previous = self._length
        self._length += len(delta)
        if not self._checks and not self._deny:
            return None
        window = self._tail + delta
        offset = previous - len(self._tail)
        self.scanned_chars += len(window)
        for finding in _scan(window, 0, self._checks, self._deny, Action.BLOCK, offset):
            # Spans wholly inside the tail were already seen complete by an earlier feed.
            if finding.end > previous:
                self._finding = finding
                break
        self._tail = window[-self.WINDOW :]
        return self._finding
