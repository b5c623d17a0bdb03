"""The Node.js client (clients/node) against the four service processes: the same answer as
the Python stubs, a final summary, and Strata's error reasons decoded from the trailers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.devstack import LocalStack
from tests.conftest import ROOT, ApiKeys
from tests.helpers import bearer, user

CLIENT_DIR = ROOT / "clients" / "node"
CLI = CLIENT_DIR / "bin" / "strata-chat.js"
MODEL = "mock-fast"
SEED = 7
MAX_OUTPUT_TOKENS = 60


@pytest.fixture(scope="module")
def node() -> str:
    """The `node` executable, with the client's pinned dependencies installed.

    `make test` installs them first (the clients/node/node_modules/.installed stamp); run
    alone, this fixture runs `npm ci` itself. Without node it skips locally but fails in CI,
    where .ci/run installs npm (and node with it)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        reason = "node and npm are needed for the Node.js client test (apt-get install npm)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    if not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"],
            cwd=CLIENT_DIR,
            check=True,
            timeout=300,
        )
    return node


def chat(
    node: str, stack: LocalStack, key: str, prompt: str, model: str = MODEL
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            node,
            str(CLI),
            stack.addresses["orchestrator"],
            model,
            prompt,
            "--seed",
            str(SEED),
            "--max-output-tokens",
            str(MAX_OUTPUT_TOKENS),
        ],
        env={**os.environ, "STRATA_API_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )


def python_answer(
    public_api: orchestrator_pb2_grpc.OrchestratorServiceStub, key: str, prompt: str
) -> tuple[str, orchestrator_pb2.StreamGenerateResponse.Final]:
    """The same request through the Python stubs, the cache bypassed so it is generated anew."""
    request = orchestrator_pb2.StreamGenerateRequest(
        model=MODEL,
        messages=[user(prompt)],
        params=common_pb2.GenerationParams(seed=SEED, max_output_tokens=MAX_OUTPUT_TOKENS),
        cache_policy=common_pb2.CachePolicy(mode=common_pb2.CACHE_MODE_BYPASS),
    )
    chunks = list(public_api.StreamGenerate(request, metadata=bearer(key), timeout=30))
    text = "".join(c.delta.text for c in chunks if c.HasField("delta"))
    return text, chunks[-1].final


def test_the_node_client_streams_the_answer_the_python_stubs_get(
    node: str,
    stack: LocalStack,
    public_api: orchestrator_pb2_grpc.OrchestratorServiceStub,
    test_keys: ApiKeys,
) -> None:
    prompt = f"What does Strata do? {uuid.uuid4().hex}"
    done = chat(node, stack, test_keys.acme, prompt)
    assert done.returncode == 0, done.stderr
    text, final = python_answer(public_api, test_keys.acme, prompt)
    assert text
    assert done.stdout == text + "\n"

    summary = json.loads(done.stderr.strip().splitlines()[-1])
    assert summary["request_id"]
    assert summary["model"] == MODEL
    assert summary["finish_reason"] == common_pb2.FinishReason.Name(final.finish_reason)
    assert summary["finish_reason"] in ("FINISH_REASON_STOP", "FINISH_REASON_LENGTH")
    assert summary["usage"]["input_tokens"] == final.usage.input_tokens > 0
    assert summary["usage"]["output_tokens"] == final.usage.output_tokens > 0
    assert summary["cost_usd_micros"] == final.cost.total_usd_micros > 0
    assert summary["cache_status"] == "CACHE_STATUS_MISS"


def test_a_wrong_key_exits_1_with_the_code_and_reason(node: str, stack: LocalStack) -> None:
    done = chat(node, stack, "sk-strata-wrongwrongwrongwrongwrongwrongwrongwro", "hi")
    assert done.returncode == 1
    assert done.stdout == ""
    assert "error: UNAUTHENTICATED API_KEY_INVALID" in done.stderr


def test_an_unknown_model_exits_1_with_the_reason_and_its_metadata(
    node: str, stack: LocalStack, test_keys: ApiKeys
) -> None:
    done = chat(node, stack, test_keys.acme, "hi", model="gpt-17")
    assert done.returncode == 1
    assert "error: NOT_FOUND MODEL_NOT_FOUND" in done.stderr
    assert '"model":"gpt-17"' in done.stderr


def test_the_client_loads_the_protos_from_the_repository(node: str) -> None:
    """Every file under protos/ resolves its imports (google/protobuf/* come with protobufjs)."""
    files = sorted(str(p.relative_to(ROOT / "protos")) for p in (ROOT / "protos").rglob("*.proto"))
    script = (
        "const l = require('@grpc/proto-loader');"
        f"for (const f of {json.dumps(files)}) l.loadSync(f, {{includeDirs: ['../../protos']}});"
    )
    done = subprocess.run(
        [node, "-e", script], cwd=CLIENT_DIR, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr


def test_the_cli_refuses_a_bad_command_line(node: str) -> None:
    done = subprocess.run([node, str(CLI), "only-an-address"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "usage: strata-chat ADDRESS MODEL PROMPT" in done.stderr
