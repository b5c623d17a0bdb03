"""`strata eval ROUTE FILE` against a running orchestrator: per-candidate scores, latency and
cost from real calls."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import yaml

from strata_cli.__main__ import main
from tests.conftest import ApiKeys
from tests.grpc.conftest import StartOrchestrator

CASES = [
    # The mock echoes the first words of the question: these two always pass.
    {"id": "echo", "prompt": "alpha beta gamma", "grade": [{"contains": ["alpha", "gamma"]}]},
    {"id": "regex", "prompt": "delta epsilon", "grade": [{"regex": "(?i)^mock answer"}]},
    # Never passes (the mock does not write JSON), and half passes.
    {"id": "json", "prompt": "give json", "grade": [{"json_schema": {"type": "object"}}]},
    {"id": "half", "prompt": "zeta", "grade": [{"contains": ["zeta", "nowhere"]}]},
]


@pytest.fixture
def routes_file(tmp_path: Path) -> Path:
    path = tmp_path / "routes.yaml"
    routes = {
        "routes": {
            "trial": {
                "policy": "rules",
                "candidates": ["mock-fast", "mock-error"],
                "rules": [{"when": {"tiers": ["free"]}, "candidates": ["mock-small"]}],
            }
        }
    }
    path.write_text(yaml.safe_dump(routes))
    return path


async def run_eval(*args: str) -> int:
    return await asyncio.to_thread(main, ["eval", *args])


async def test_eval_scores_every_candidate_of_the_route(
    start_orchestrator: StartOrchestrator,
    routes_file: Path,
    models_file: Path,
    tmp_path: Path,
    test_keys: ApiKeys,
    capsys: pytest.CaptureFixture[str],
) -> None:
    served = await start_orchestrator(routes_file=routes_file)
    cases = tmp_path / "cases.jsonl"
    cases.write_text("\n".join(json.dumps(c) for c in CASES) + "\n")

    code = await run_eval(
        "trial",
        str(cases),
        "--address",
        served.address,
        "--key",
        test_keys.acme,
        "--routes",
        str(routes_file),
        "--models",
        str(models_file),
        "--json",
    )

    assert code == 0
    out, err = capsys.readouterr()
    summary = json.loads(out)
    models = summary["models"]
    # The route's candidates and the one only its rule names, each on every case.
    assert sorted(models) == ["mock-error", "mock-fast", "mock-small"]
    for name in ("mock-fast", "mock-small"):
        stats = models[name]
        assert (stats["n"], stats["errors"]) == (4, 0)
        assert stats["mean_score"] == pytest.approx((1 + 1 + 0 + 0.5) / 4)
        assert stats["total_cost_usd_micros"] > 0
        assert 0 < stats["latency_p50_s"] <= stats["latency_p95_s"]
    assert (models["mock-error"]["n"], models["mock-error"]["errors"]) == (4, 4)
    assert summary["overall"]["n"] == 12
    # Progress went to stderr, one line per call, naming failures by reason.
    assert err.count("] mock-") == 12
    assert "PROVIDER" in err or "UNAVAILABLE" in err


async def test_eval_refuses_an_unknown_route_or_a_bad_case_file(
    routes_file: Path, models_file: Path, tmp_path: Path
) -> None:
    cases = tmp_path / "cases.jsonl"
    cases.write_text(json.dumps(CASES[0]) + "\n")
    common = ["--key", "sk-strata-x", "--routes", str(routes_file), "--models", str(models_file)]

    assert await run_eval("nope", str(cases), *common) == 2
    cases.write_text('{"id": "no-grader", "prompt": "hi"}\n')
    assert await run_eval("trial", str(cases), *common) == 2
