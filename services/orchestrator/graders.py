"""Evaluating models on a set of cases, to choose a route's candidates on evidence.

`strata eval ROUTE FILE` runs each case of a JSON-lines file through the route's models;
this module holds what does not need a network: the graders that score an answer, the case
file's loader, and the summary of the results.

    {"id": "capital", "prompt": "Capital of France? One word.", "grade": [{"exact": "Paris"}]}
    {"id": "count", "messages": [{"role": "user", "content": "Say a number"}],
     "grade": [{"regex": "^\\\\d+$"}]}

Grader specs (each a mapping with one key):

    {"exact": "Paris"}            1 if the answer is exactly this, else 0
    {"regex": "^\\\\d+$"}           1 if the pattern is found in the answer (re.search), else 0
    {"json_schema": {...}}        1 if the answer is JSON valid under the schema, else 0
    {"contains": ["a", "b"]}      the share of the strings found, ignoring case

Every grader ignores whitespace around the answer; `json_schema` also accepts an answer
wrapped in a single Markdown code fence, as models often write JSON that way.
A case's score is the mean of its graders' scores.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Protocol, TypedDict

import jsonschema  # type: ignore[import-untyped]

ROLES = frozenset({"system", "user", "assistant"})
CASE_KEYS = frozenset({"id", "prompt", "messages", "grade", "expected", "tags"})


class Grader(Protocol):
    """Scores one answer from 0 (wrong) to 1 (right)."""

    name: str

    def grade(self, output: str) -> float:
        """The answer's score, 0..1."""
        ...


@dataclass(slots=True)
class ExactGrader:
    """1 when the answer, without surrounding whitespace, is exactly `expected`."""

    expected: str
    name: str = "exact"

    def grade(self, output: str) -> float:
        return 1.0 if output.strip() == self.expected.strip() else 0.0


@dataclass(slots=True)
class RegexGrader:
    """1 when `pattern` is found in the answer (anchor it with ^ and $ to match it whole)."""

    pattern: re.Pattern[str]
    name: str = "regex"

    def grade(self, output: str) -> float:
        return 1.0 if self.pattern.search(output.strip()) else 0.0


class JsonSchemaGrader:
    """1 when the answer is JSON that the schema accepts; 0 for invalid JSON.

    The schema's `$schema` picks the draft (2020-12 when absent); `format` is not asserted.
    """

    name = "json_schema"

    def __init__(self, schema: Mapping[str, Any]) -> None:
        validator_class = jsonschema.validators.validator_for(schema)
        try:
            validator_class.check_schema(schema)
        except jsonschema.SchemaError as err:
            raise ValueError(f"json_schema: invalid schema: {err.message}") from err
        self.schema = schema
        self._validator = validator_class(schema)

    def grade(self, output: str) -> float:
        try:
            document = json.loads(_unfenced(output))
        except ValueError:
            return 0.0
        return 1.0 if self._validator.is_valid(document) else 0.0


@dataclass(slots=True)
class ContainsGrader:
    """The share of `needles` found in the answer, ignoring case."""

    needles: tuple[str, ...]
    name: str = "contains"

    def grade(self, output: str) -> float:
        haystack = output.casefold()
        found = sum(1 for needle in self.needles if needle.casefold() in haystack)
        return found / len(self.needles)


_FENCE = re.compile(r"\A```[A-Za-z0-9_-]*[ \t]*\n(.*)\n```\Z", re.DOTALL)


def _unfenced(output: str) -> str:
    text = output.strip()
    fenced = _FENCE.match(text)
    return fenced.group(1) if fenced else text


def grader_from_spec(spec: Mapping[str, Any]) -> Grader:
    """The grader a spec describes; ValueError says what is wrong with a bad one."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ValueError(f"a grader is a mapping with one key (its kind), not {spec!r}")
    ((kind, value),) = spec.items()
    if kind == "exact":
        if not isinstance(value, str):
            raise ValueError(f"exact: expected a string, not {value!r}")
        return ExactGrader(value)
    if kind == "regex":
        if not isinstance(value, str):
            raise ValueError(f"regex: expected a pattern string, not {value!r}")
        try:
            return RegexGrader(re.compile(value))
        except re.error as err:
            raise ValueError(f"regex: invalid pattern {value!r}: {err}") from err
    if kind == "json_schema":
        if not isinstance(value, Mapping):
            raise ValueError(f"json_schema: expected a schema object, not {value!r}")
        return JsonSchemaGrader(value)
    if kind == "contains":
        needles = [value] if isinstance(value, str) else value
        if (
            not isinstance(needles, list)
            or not needles
            or not all(isinstance(n, str) and n for n in needles)
        ):
            raise ValueError(f"contains: expected a list of non-empty strings, not {value!r}")
        return ContainsGrader(tuple(needles))
    raise ValueError(f"unknown grader {kind!r}; known: contains, exact, json_schema, regex")


@dataclass(slots=True)
class EvalCase:
    """One case of an evaluation: what to ask and how to grade the answer."""

    id: str
    """Unique within the file."""
    prompt: str | None
    """The question as a single user message; exactly one of prompt and messages is set."""
    messages: list[dict[str, str]] | None
    """The conversation ({"role", "content"}), oldest first."""
    graders: list[Grader]
    """At least one; the case's score is their mean."""
    expected: str | None = None
    """The reference answer, for reports (and an exact grader when `grade` is left out)."""
    tags: dict[str, str] = field(default_factory=dict)
    """Tags sent with the request, for routes whose rules match on them."""

    def score(self, output: str) -> float:
        """The mean of the graders' scores for this answer."""
        return sum(g.grade(output) for g in self.graders) / len(self.graders)


class CaseFileError(ValueError):
    """A case file cannot be read or has an invalid line; the message names file and line."""


def load_cases(path: Path) -> list[EvalCase]:
    """Reads a JSON-lines case file; blank lines are skipped. Raises CaseFileError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CaseFileError(f"cannot read case file {path}: {err}") from err
    cases: list[EvalCase] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            case = _case(json.loads(line))
        except ValueError as err:  # json.JSONDecodeError is one
            raise CaseFileError(f"{path}:{number}: {err}") from err
        if case.id in seen:
            raise CaseFileError(f"{path}:{number}: case id {case.id!r} appears twice")
        seen.add(case.id)
        cases.append(case)
    if not cases:
        raise CaseFileError(f"case file {path} holds no cases")
    return cases


def _case(raw: Any) -> EvalCase:
    if not isinstance(raw, dict):
        raise ValueError("a case is a JSON object")
    unknown = sorted(set(raw) - CASE_KEYS)
    if unknown:
        raise ValueError(f"unknown keys {unknown}; known: {sorted(CASE_KEYS)}")
    case_id = raw.get("id")
    if not isinstance(case_id, str) or not case_id:
        raise ValueError("`id` must be a non-empty string")
    prompt, messages = raw.get("prompt"), raw.get("messages")
    if (prompt is None) == (messages is None):
        raise ValueError(f"case {case_id!r}: give exactly one of `prompt` and `messages`")
    if prompt is not None and (not isinstance(prompt, str) or not prompt):
        raise ValueError(f"case {case_id!r}: `prompt` must be a non-empty string")
    if messages is not None:
        _check_messages(case_id, messages)
    expected = raw.get("expected")
    if expected is not None and not isinstance(expected, str):
        raise ValueError(f"case {case_id!r}: `expected` must be a string")
    tags = raw.get("tags", {})
    if not isinstance(tags, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in tags.items()
    ):
        raise ValueError(f"case {case_id!r}: `tags` must map strings to strings")
    specs = raw.get("grade")
    if specs is None and expected is not None:
        specs = [{"exact": expected}]
    if not isinstance(specs, list) or not specs:
        raise ValueError(f"case {case_id!r}: `grade` must be a non-empty list of graders")
    graders = []
    for spec in specs:
        try:
            graders.append(grader_from_spec(spec))
        except ValueError as err:
            raise ValueError(f"case {case_id!r}: {err}") from err
    return EvalCase(case_id, prompt, messages, graders, expected, tags)


def _check_messages(case_id: str, messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"case {case_id!r}: `messages` must be a non-empty list")
    for message in messages:
        if (
            not isinstance(message, dict)
            or set(message) != {"role", "content"}
            or message["role"] not in ROLES
            or not isinstance(message["content"], str)
        ):
            raise ValueError(
                f"case {case_id!r}: each message is {{'role', 'content'}} with a role of "
                f"{sorted(ROLES)}, not {message!r}"
            )


@dataclass(slots=True)
class CaseResult:
    """How one model did on one case."""

    case_id: str
    model: str
    score: float
    """0..1; ignored (counted as 0) when `error` is set."""
    latency_s: float
    cost_usd_micros: int
    error: str | None = None
    """Why the model gave no answer (the error's reason), or None."""


class Stats(TypedDict):
    """Figures of a group of results (one model's, or all)."""

    n: int
    """Results."""
    errors: int
    """Results without an answer."""
    mean_score: float
    """Mean score, errors counted as 0."""
    latency_p50_s: float | None
    """Median latency of the answered results (None when none answered)."""
    latency_p95_s: float | None
    """95th percentile latency of the answered results."""
    total_cost_usd_micros: int
    """What all results cost, errors included (a failed stream may have been charged)."""
    mean_cost_usd_micros: float
    """Total cost over `n`."""


class Summary(TypedDict):
    """Figures per model (sorted by name) and over all results."""

    models: dict[str, Stats]
    overall: Stats


def summarize(results: Sequence[CaseResult]) -> Summary:
    """Per model and overall: count, mean score, latency p50/p95, cost, errors."""
    by_model: dict[str, list[CaseResult]] = {}
    for result in results:
        by_model.setdefault(result.model, []).append(result)
    return {
        "models": {model: _stats(by_model[model]) for model in sorted(by_model)},
        "overall": _stats(results),
    }


def _stats(results: Sequence[CaseResult]) -> Stats:
    n = len(results)
    answered = sorted(r.latency_s for r in results if r.error is None)
    total_cost = sum(r.cost_usd_micros for r in results)
    return {
        "n": n,
        "errors": n - len(answered),
        "mean_score": sum(r.score for r in results if r.error is None) / n if n else 0.0,
        "latency_p50_s": percentile(answered, 50),
        "latency_p95_s": percentile(answered, 95),
        "total_cost_usd_micros": total_cost,
        "mean_cost_usd_micros": total_cost / n if n else 0.0,
    }


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile, interpolating linearly between the nearest ranks (as numpy's
    default does); None for no values."""
    ordered = sorted(values)
    if not ordered:
        return None
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def format_summary(summary: Summary) -> str:
    """A plain-text table: one row per model, then the overall row."""
    header = ("model", "n", "errors", "score", "p50 s", "p95 s", "cost USD", "USD/case")
    rows = [_row(model, stats) for model, stats in summary["models"].items()]
    rows.append(_row("overall", summary["overall"]))
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        first, *rest = cells
        return "  ".join(
            [first.ljust(widths[0]), *(c.rjust(w) for c, w in zip(rest, widths[1:], strict=True))]
        ).rstrip()

    separator = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), separator, *map(line, rows[:-1]), separator, line(rows[-1])])


def _row(label: str, stats: Stats) -> tuple[str, ...]:
    return (
        label,
        str(stats["n"]),
        str(stats["errors"]),
        f"{stats['mean_score']:.3f}",
        _seconds(stats["latency_p50_s"]),
        _seconds(stats["latency_p95_s"]),
        _usd(stats["total_cost_usd_micros"]),
        _usd(stats["mean_cost_usd_micros"]),
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _usd(micros: float) -> str:
    # Decimal keeps whole micro-USD exact; a mean is shown to the micro, rounded.
    return f"{Decimal(str(micros)) / 1_000_000:.6f}"
