"""The `strata` command line against the running stack, as a user runs it: a subprocess with
STRATA_ADDRESS and STRATA_API_KEY, human output by default, --json for scripts, exit codes
0 (done), 1 (a gRPC error, with its reason) and 2 (usage or missing credentials)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from strata_cli.devstack import LocalStack
from tests.conftest import ROOT, ApiKeys
from tests.helpers import fresh_stack

ADMIN_TOKEN = secrets.token_urlsafe(24)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    redis_url: str,
    tenants_file: Path,
    models_file: Path,
    guardrails_file: Path,
) -> Iterator[LocalStack]:
    """The stack of tests/stack/conftest.py with the control service's admin API on."""
    running = fresh_stack(
        tmp_path_factory.mktemp("stack"),
        redis_url,
        tenants_file,
        models_file,
        {
            "STRATA_CONTROL_GUARDRAILS_FILE": str(guardrails_file),
            "STRATA_ORCHESTRATOR_GUARDRAILS_FILE": str(guardrails_file),
            "STRATA_CONTROL_ADMIN_TOKEN": ADMIN_TOKEN,
        },
    )
    try:
        yield running
    finally:
        running.stop()


class Cli:
    """Runs `strata` in a subprocess with the stack's addresses and a key."""

    def __init__(self, stack: LocalStack, key: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("STRATA_")}
        self.env.update(
            STRATA_ADDRESS=stack.addresses["orchestrator"],
            STRATA_CONTROL_ADDRESS=stack.addresses["control"],
            STRATA_API_KEY=key,
            STRATA_ADMIN_TOKEN=ADMIN_TOKEN,
        )

    def __call__(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "strata_cli", *args],
            cwd=ROOT,
            env=env if env is not None else self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def json(self, *args: str) -> Any:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


@pytest.fixture(scope="module")
def cli(stack: LocalStack, test_keys: ApiKeys) -> Cli:
    return Cli(stack, test_keys.acme)


def test_chat_streams_the_answer_and_exits_0(cli: Cli) -> None:
    done = cli("chat", "--model", "mock-small", f"hello {uuid.uuid4().hex}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()
    # The start line names the request and model; the last line the finish and the tokens.
    assert re.search(r"^\[\S+ · mock-small · cache MISS\]", done.stderr, re.M), done.stderr
    assert re.search(r"\[stop · \d+ in / \d+ out tokens", done.stderr), done.stderr


def test_usage_budgets_and_keys_as_json(cli: Cli) -> None:
    assert cli("chat", f"counted {uuid.uuid4().hex}").returncode == 0
    usage = cli.json("usage", "--tenant", "acme", "--period", "day")
    assert int(usage["requests"]) >= 1
    assert int(usage["usage"]["output_tokens"]) > 0
    assert int(usage["spent_usd_micros"]) > 0

    assert (
        cli("budgets", "set", "--tenant", "acme", "--period", "day", "--usd", "50").returncode == 0
    )
    shown = cli("budgets", "show", "--tenant", "acme", "--period", "day")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("day budget $50.00: spent $")

    keys = cli.json("keys", "list", "--tenant", "acme")
    assert "acme-main" in {k["key_id"] for k in keys["keys"]}


def test_documents_ingest_list_search_delete(cli: Cli, tmp_path: Path) -> None:
    collection = f"cli-{uuid.uuid4().hex[:8]}"
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "refunds.md").write_text(
        "# Refunds\n\nRefunds are paid within 14 days to the card used for the purchase.\n"
    )
    (tmp_path / "docs" / "shipping.txt").write_text("Parcels ship from Rotterdam every weekday.\n")
    (tmp_path / "docs" / "notes.csv").write_text("ignored,not a document\n")
    (tmp_path / "warranty.md").write_text("The warranty lasts two years from delivery.\n")

    done = cli(
        "documents", "ingest", collection, str(tmp_path / "docs"), str(tmp_path / "warranty.md"),
        "--batch-size", "2", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    ingested = json.loads(done.stdout)
    assert ingested["stored"] == 3 and ingested["chunks"] >= 3
    assert sorted(d["id"] for d in ingested["documents"]) == ["refunds", "shipping", "warranty"]
    # Not a terminal: one progress line per batch.
    assert re.findall(r"^batch (\d)/2: (\d)/3 documents", done.stderr, re.M) == [
        ("1", "2"),
        ("2", "3"),
    ]

    listed = cli.json("documents", "list", collection)
    assert {d["id"]: d["version"] for d in listed["documents"]} == {
        d["id"]: d["version"] for d in ingested["documents"]
    }

    found = cli.json("documents", "search", collection, "when do I get my money back")
    assert found["hits"][0]["document_id"] == "refunds"
    assert "14 days" in found["hits"][0]["text"]

    assert cli.json("documents", "delete", collection, "shipping", "nope") == {"deleted": 1}
    assert [d["id"] for d in cli.json("documents", "list", collection)["documents"]] == [
        "refunds",
        "warranty",
    ]


def test_a_job_submitted_and_watched_succeeds_and_its_request_has_a_trace(cli: Cli) -> None:
    submitted = cli.json("jobs", "submit", "--model", "mock-small", f"job {uuid.uuid4().hex}")
    job_id = submitted["job_id"]
    watched = cli.json("jobs", "watch", job_id)
    assert watched["job_id"] == job_id
    assert watched["state"] == "JOB_STATE_SUCCEEDED"
    assert watched["generate"]["text"]
    request_id = watched["generate"]["request_id"]

    got = cli("jobs", "get", job_id)
    assert got.returncode == 0, got.stderr
    assert re.search(r"^state\s+SUCCEEDED$", got.stdout, re.M)

    # The record is written as the request ends; give it a moment.
    deadline = time.monotonic() + 10
    while True:
        done = cli("trace", request_id, "--json")
        if done.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["request_id"] == request_id
    assert record["model"] == "mock-small"


def test_a_bad_key_exits_1_with_the_reason(cli: Cli) -> None:
    done = cli("chat", "--key", "sk-strata-not-a-key", "hello")
    assert done.returncode == 1
    assert "UNAUTHENTICATED API_KEY_INVALID" in done.stderr


def test_a_missing_key_exits_2(cli: Cli) -> None:
    env = {k: v for k, v in cli.env.items() if k != "STRATA_API_KEY"}
    for command in (["chat", "hello"], ["jobs", "list"], ["documents", "list", "faq"]):
        done = cli(*command, env=env)
        assert done.returncode == 2, command
        assert "no API key" in done.stderr


def test_an_unknown_job_exits_1_with_job_not_found(cli: Cli) -> None:
    done = cli("jobs", "get", "job-that-does-not-exist")
    assert done.returncode == 1
    assert "NOT_FOUND JOB_NOT_FOUND" in done.stderr


def test_routes_from_the_file_and_from_the_running_orchestrator(cli: Cli) -> None:
    offline = cli.json("routes")
    support = next(r for r in offline["routes"] if r["name"] == "support")
    assert (support["policy"], support["candidates"]) == ("weighted", ["mock-small", "mock-fast"])
    # The stack runs without a routes file: the orchestrator serves none.
    assert cli.json("routes", "--remote")["routes"] == []
