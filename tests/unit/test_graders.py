"""Evaluation: graders, the case file, and the summary of results."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from services.orchestrator.graders import (
    CaseFileError,
    CaseResult,
    EvalCase,
    Grader,
    format_summary,
    grader_from_spec,
    load_cases,
    percentile,
    summarize,
)

# Graders


@pytest.mark.parametrize(
    ("spec", "output", "score"),
    [
        ({"exact": "Paris"}, "Paris", 1.0),
        ({"exact": "Paris"}, "  Paris\n", 1.0),
        ({"exact": "Paris"}, "paris", 0.0),
        ({"exact": "Paris"}, "Paris.", 0.0),
        ({"exact": "Paris"}, "It is Paris", 0.0),
        ({"regex": r"^\d+$"}, "42", 1.0),
        ({"regex": r"^\d+$"}, "42\n\n", 1.0),
        ({"regex": r"^\d+$"}, "42 apples", 0.0),
        ({"regex": r"^\d+$"}, "", 0.0),
        ({"regex": r"\bParis\b"}, "The capital is Paris.", 1.0),
        ({"regex": r"\bParis\b"}, "Parisian", 0.0),
        ({"contains": ["paris", "FRANCE"]}, "Paris is in France", 1.0),
        ({"contains": ["paris", "france", "seine", "louvre"]}, "Paris, on the Seine", 0.5),
        ({"contains": ["berlin"]}, "Paris", 0.0),
        ({"contains": "Paris"}, "PARIS", 1.0),
    ],
)
def test_graders_score_hits_and_misses(spec, output, score):
    grader = grader_from_spec(spec)

    assert grader.name == next(iter(spec))
    assert grader.grade(output) == score


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


@pytest.mark.parametrize(
    ("output", "score"),
    [
        ('{"name": "Ada", "age": 36}', 1.0),
        ('  {"name": "Ada", "age": 36}\n', 1.0),
        ('```json\n{"name": "Ada", "age": 36}\n```', 1.0),
        ('```\n{"name": "Ada", "age": 36}\n```', 1.0),
        ('{"name": "Ada"}', 0.0),
        ('{"name": "Ada", "age": -1}', 0.0),
        ('{"name": "Ada", "age": 36, "extra": true}', 0.0),
        ('["Ada", 36]', 0.0),
        # not JSON at all
        ("Ada, 36", 0.0),
        ('{"name": "Ada", "age": 36', 0.0),
        ("", 0.0),
        ('Here you go: {"name": "Ada", "age": 36}', 0.0),
    ],
)
def test_json_schema_grader(output, score):
    assert grader_from_spec({"json_schema": PERSON}).grade(output) == score


def test_json_schema_grader_follows_the_declared_draft():
    # Draft 4's exclusiveMaximum is a boolean modifier of maximum.
    schema = {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "number",
        "maximum": 10,
        "exclusiveMaximum": True,
    }
    grader = grader_from_spec({"json_schema": schema})

    assert grader.grade("9.5") == 1.0
    assert grader.grade("10") == 0.0


@pytest.mark.parametrize(
    ("spec", "complaint"),
    [
        ({"fuzzy": "Paris"}, "unknown grader 'fuzzy'"),
        ({}, "one key"),
        ({"exact": "a", "regex": "b"}, "one key"),
        ({"exact": 3}, "exact: expected a string"),
        ({"regex": "("}, "regex: invalid pattern"),
        ({"regex": ["a"]}, "regex: expected a pattern"),
        ({"json_schema": "object"}, "json_schema: expected a schema object"),
        ({"json_schema": {"type": "objekt"}}, "json_schema: invalid schema"),
        ({"contains": []}, "contains: expected a list"),
        ({"contains": ["a", ""]}, "contains: expected a list"),
        ({"contains": ["a", 1]}, "contains: expected a list"),
    ],
)
def test_bad_grader_specs_are_value_errors(spec, complaint):
    with pytest.raises(ValueError, match=re.escape(complaint)):
        grader_from_spec(spec)


def test_graders_satisfy_the_protocol():
    graders: list[Grader] = [
        grader_from_spec({"exact": "x"}),
        grader_from_spec({"regex": "x"}),
        grader_from_spec({"json_schema": {}}),
        grader_from_spec({"contains": ["x"]}),
    ]

    assert [g.name for g in graders] == ["exact", "regex", "json_schema", "contains"]
    assert all(0.0 <= g.grade("x") <= 1.0 for g in graders)


# Case files


def write_cases(path: Path, *lines: Any) -> Path:
    path.write_text(
        "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n"
    )
    return path


def test_load_cases_reads_prompts_and_conversations(tmp_path):
    path = write_cases(
        tmp_path / "cases.jsonl",
        {"id": "capital", "prompt": "Capital of France?", "grade": [{"exact": "Paris"}]},
        "",
        {
            "id": "number",
            "messages": [
                {"role": "system", "content": "Answer with digits only."},
                {"role": "user", "content": "Two plus two?"},
            ],
            "grade": [{"regex": r"^\d+$"}, {"contains": ["4"]}],
            "tags": {"tier": "free"},
        },
        {"id": "shorthand", "prompt": "Say yes", "expected": "yes"},
    )

    capital, number, shorthand = load_cases(path)

    assert capital.id == "capital"
    assert capital.prompt == "Capital of France?"
    assert capital.messages is None
    assert capital.expected is None
    assert [g.name for g in capital.graders] == ["exact"]
    assert capital.score("Paris") == 1.0

    assert number.prompt is None
    assert number.messages is not None and number.messages[1]["content"] == "Two plus two?"
    assert number.tags == {"tier": "free"}
    assert number.score("4") == 1.0
    assert number.score("four") == 0.0
    assert number.score("4 apples") == 0.5

    # `expected` alone grades by exact match.
    assert shorthand.expected == "yes"
    assert [g.name for g in shorthand.graders] == ["exact"]
    assert shorthand.score("yes\n") == 1.0


@pytest.mark.parametrize(
    ("lines", "complaint"),
    [
        (["{not json"], ":1: Expecting property name"),
        (['["a list"]'], ":1: a case is a JSON object"),
        ([{"prompt": "hi", "grade": [{"exact": "x"}]}], ":1: `id` must be a non-empty string"),
        ([{"id": 7, "prompt": "hi", "grade": [{"exact": "x"}]}], "`id` must be a non-empty"),
        ([{"id": "a", "grade": [{"exact": "x"}]}], "exactly one of `prompt` and `messages`"),
        (
            [
                {
                    "id": "a",
                    "prompt": "hi",
                    "messages": [{"role": "user", "content": "hi"}],
                    "grade": [{"exact": "x"}],
                }
            ],
            "exactly one of `prompt` and `messages`",
        ),
        ([{"id": "a", "prompt": "", "grade": [{"exact": "x"}]}], "`prompt` must be a non-empty"),
        (
            [
                {
                    "id": "a",
                    "messages": [{"role": "robot", "content": "x"}],
                    "grade": [{"exact": "x"}],
                }
            ],
            "each message is",
        ),
        (
            [{"id": "a", "messages": [], "grade": [{"exact": "x"}]}],
            "`messages` must be a non-empty",
        ),
        ([{"id": "a", "prompt": "hi"}], "`grade` must be a non-empty list"),
        ([{"id": "a", "prompt": "hi", "grade": []}], "`grade` must be a non-empty list"),
        (
            [{"id": "a", "prompt": "hi", "grade": [{"fuzzy": 1}]}],
            "case 'a': unknown grader 'fuzzy'",
        ),
        ([{"id": "a", "prompt": "hi", "grades": [{"exact": "x"}]}], "unknown keys ['grades']"),
        ([{"id": "a", "prompt": "hi", "grade": [{"exact": "x"}], "tags": {"t": 1}}], "`tags`"),
        ([{"id": "a", "prompt": "hi", "expected": 4}], "`expected` must be a string"),
        (
            [
                {"id": "a", "prompt": "hi", "grade": [{"exact": "x"}]},
                {"id": "b", "prompt": "hi", "grade": [{"exact": "x"}]},
                {"id": "a", "prompt": "again", "grade": [{"exact": "x"}]},
            ],
            ":3: case id 'a' appears twice",
        ),
        ([], "holds no cases"),
        (["", "   "], "holds no cases"),
    ],
)
def test_load_cases_errors_name_the_file_and_line(tmp_path, lines, complaint):
    path = write_cases(tmp_path / "cases.jsonl", *lines)

    with pytest.raises(CaseFileError) as caught:
        load_cases(path)

    assert str(path) in str(caught.value)
    assert complaint in str(caught.value)


def test_load_cases_of_a_missing_file(tmp_path):
    with pytest.raises(CaseFileError, match="cannot read case file"):
        load_cases(tmp_path / "nope.jsonl")


def test_case_file_errors_are_value_errors():
    assert issubclass(CaseFileError, ValueError)


# Summary

RESULTS = [
    CaseResult("c1", "model-a", 1.0, 1.0, 100),
    CaseResult("c2", "model-a", 0.5, 3.0, 200),
    # An error counts as a score of 0, and its latency is left out of the percentiles.
    CaseResult("c3", "model-a", 0.9, 0.1, 50, error="UPSTREAM_TIMEOUT"),
    CaseResult("c1", "model-b", 1.0, 2.0, 10),
    CaseResult("c2", "model-b", 0.0, 4.0, 10),
]


def test_summarize_per_model_and_overall():
    summary = summarize(RESULTS)

    assert list(summary["models"]) == ["model-a", "model-b"]
    a = summary["models"]["model-a"]
    assert a["n"] == 3
    assert a["errors"] == 1
    assert a["mean_score"] == pytest.approx(0.5)
    assert a["latency_p50_s"] == pytest.approx(2.0)
    assert a["latency_p95_s"] == pytest.approx(2.9)
    assert a["total_cost_usd_micros"] == 350
    assert a["mean_cost_usd_micros"] == pytest.approx(350 / 3)

    b = summary["models"]["model-b"]
    assert (b["n"], b["errors"]) == (2, 0)
    assert b["mean_score"] == pytest.approx(0.5)
    assert b["latency_p50_s"] == pytest.approx(3.0)
    assert b["latency_p95_s"] == pytest.approx(3.9)
    assert (b["total_cost_usd_micros"], b["mean_cost_usd_micros"]) == (20, 10.0)

    overall = summary["overall"]
    assert (overall["n"], overall["errors"]) == (5, 1)
    assert overall["mean_score"] == pytest.approx(2.5 / 5)
    assert overall["latency_p50_s"] == pytest.approx(2.5)
    assert overall["latency_p95_s"] == pytest.approx(3.85)
    assert overall["total_cost_usd_micros"] == 370
    assert overall["mean_cost_usd_micros"] == pytest.approx(74.0)


def test_summarize_a_model_that_only_failed():
    summary = summarize([CaseResult("c1", "broken", 0.0, 0.2, 0, error="PROVIDER_UNAVAILABLE")])

    stats = summary["models"]["broken"]
    assert (stats["n"], stats["errors"], stats["mean_score"]) == (1, 1, 0.0)
    assert stats["latency_p50_s"] is None
    assert stats["latency_p95_s"] is None


def test_summarize_nothing():
    summary = summarize([])

    assert summary["models"] == {}
    assert summary["overall"]["n"] == 0
    assert summary["overall"]["mean_score"] == 0.0
    assert summary["overall"]["latency_p50_s"] is None


def test_percentile_interpolates_between_ranks():
    assert percentile([], 50) is None
    assert percentile([7.0], 95) == 7.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 100) == 4.0
    assert percentile(range(1, 101), 95) == pytest.approx(95.05)


def test_format_summary_is_a_table_with_an_overall_row():
    table = format_summary(summarize(RESULTS))
    lines = table.splitlines()

    assert lines[0].split() == [
        "model", "n", "errors", "score", "p50", "s", "p95", "s", "cost", "USD", "USD/case",
    ]  # fmt: skip
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == [
        "model-a", "3", "1", "0.500", "2.000", "2.900", "0.000350", "0.000117",
    ]  # fmt: skip
    assert lines[3].split() == [
        "model-b", "2", "0", "0.500", "3.000", "3.900", "0.000020", "0.000010",
    ]  # fmt: skip
    assert lines[4] == lines[1]
    assert lines[5].split() == [
        "overall", "5", "1", "0.500", "2.500", "3.850", "0.000370", "0.000074",
    ]  # fmt: skip
    # Columns line up: every row is as wide as the header's separator.
    assert {len(line) for line in lines[1:]} <= {len(lines[1])}


def test_format_summary_shows_missing_latencies_as_dashes():
    table = format_summary(summarize([CaseResult("c", "broken", 0.0, 1.0, 0, error="X")]))

    assert table.splitlines()[2].split() == [
        "broken",
        "1",
        "1",
        "0.000",
        "-",
        "-",
        "0.000000",
        "0.000000",
    ]


def test_eval_case_scores_the_mean_of_its_graders():
    case = EvalCase(
        id="c",
        prompt="What is the capital of France?",
        messages=None,
        graders=[grader_from_spec({"exact": "Paris"}), grader_from_spec({"contains": ["paris"]})],
        expected="Paris",
    )

    assert case.score("Paris") == 1.0
    assert case.score("Paris, of course") == 0.5
    assert case.score("Lyon") == 0.0
