"""What Strata adds over calling the upstream directly, side by side with the LiteLLM proxy.

    make bench
    .venv/bin/python -m bench.gateway_overhead [--concurrency 1,4,16,64] [--requests 400]
        [--rounds 3] [--scenarios unary-miss,...] [--targets direct,strata-http,...]
        [--chunks 20] [--chunk-delay-ms 0] [--results bench/RESULTS.md]

Starts a fast local OpenAI-compatible upstream (bench/upstream.py) as a process, the four
services plus the HTTP door as processes twice (`strata-*`: no trace export; `*+otel`:
traces and metrics exported over OTLP to a receiver in this process), and the LiteLLM proxy
(bench/peer.py, its own virtualenv, pinned 1.80.x) with 1 and 2 workers, all pointed at
the same upstream. Then, for each scenario and concurrency level, it runs `--rounds`
rounds; in each round every target gets `--requests` requests at that concurrency, in an
order that rotates from round to round, so the machine's drift falls on all alike.

Targets: `direct` (the upstream itself: the baseline), `strata-http` (the OpenAI door),
`strata-grpc` (the orchestrator's Generate/StreamGenerate, Strata's primary API), the same
two with tracing (`+otel`), `litellm-1w` and `litellm-2w`. Scenarios: `unary-miss` and
`stream-miss` (new questions), `exact-hit` (one question asked again and again),
`semantic-hit` (paraphrases of questions stored just before the round), `semantic-miss`
(questions near stored ones but about something else). The peer runs without a cache, so
in the cache scenarios its column is what it costs to pass the request on.

Per round and target: latency p50/p90/p99 (for streams: the whole stream; and time to the
first content chunk), throughput, errors, upstream calls per request (a cache hit makes
none), CPU ms per request of each process tree (from /proc) and its resident memory. The
report gives medians over rounds; `added` is the target's value minus `direct`'s in the
same round. Results go to `--results` (the part between the markers) with a PNG chart of
added latency against concurrency (matplotlib, in a virtualenv of its own under
bench/.work/, never a project dependency), and every round as JSON under bench/.work/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import venv
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import yaml

from bench import procs
from bench.harness import bench_redis, percentile
from bench.peer import LITELLM_VERSION, LiteLLMProxy, PeerUnavailable, ensure_installed
from services.control.keys import new_key
from services.executor.providers.http import AiohttpTransport
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from strata_cli.devstack import SERVICES, LocalStack, StackError, wait_http_ok
from tests.otlp_receiver import OtlpReceiver

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "bench" / ".work"
PLOT_VENV = WORK / "plot-venv"
MATPLOTLIB_VERSION = "3.10.8"
MODEL = "bench"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

ALL_TARGETS = (
    "direct",
    "strata-http",
    "strata-grpc",
    "strata-http+otel",
    "strata-grpc+otel",
    "litellm-1w",
    "litellm-2w",
)
STRATA_PARTS = ("gateway", "orchestrator", "cache", "executor", "control")
TOPICS = (
    "password", "invoice", "parcel", "refund", "address", "plan", "card", "order",
    "subscription", "username", "phone number", "email", "delivery slot", "payment method",
)  # fmt: skip
OTHER_TOPICS = (
    "favourite colour", "garden hose", "bicycle tyre", "holiday photos", "piano lesson",
    "kitchen tap", "fishing rod", "birthday cake", "chess opening", "violin string",
)  # fmt: skip
WORDS = (
    "amber", "basalt", "canyon", "dolphin", "ember", "fjord", "glacier", "harbour", "iris",
    "juniper", "kelp", "lantern", "meadow", "nebula", "orchid", "prairie", "quartz", "raven",
    "saffron", "tundra", "umber", "valley", "walnut", "xenon", "yarrow", "zephyr", "anvil",
    "bramble", "cobalt", "delta", "falcon", "granite", "hazel", "indigo", "jasper", "kestrel",
    "lagoon", "marble", "nutmeg", "oasis", "pebble", "quill", "ridge", "sorrel", "thistle",
)  # fmt: skip


@dataclass(frozen=True)
class Scenario:
    name: str
    stream: bool
    prompts: str
    """`unique`, `exact`, `paraphrase` (of primed questions) or `near` (primed, other topic)."""
    exact_only: bool = False
    """Strata's cache by exact match only (no embedding): admission + exact miss + executor."""


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("unary-miss", False, "unique"),
        Scenario("unary-exact-miss", False, "unique", exact_only=True),
        Scenario("stream-exact-miss", True, "unique", exact_only=True),
        Scenario("stream-miss", True, "unique"),
        Scenario("exact-hit", False, "exact"),
        Scenario("semantic-hit", False, "paraphrase"),
        Scenario("semantic-miss", False, "near"),
    )
}


# --- prompts -------------------------------------------------------------------------------


class Prompts:
    """The questions of a round: each request its own, none repeated across rounds or targets
    (so one target's stored answers never serve another's), except in `exact-hit`."""

    def __init__(self, seed: int) -> None:
        self._random = random.Random(seed)
        self._serial = 0

    def block(self, size: int) -> int:
        """Reserves `size` serial numbers; returns the first."""
        first = self._serial
        self._serial += size
        return first

    def unique(self, n: int) -> str:
        words = self._random.sample(WORDS, 4)
        return f"Tell me about {words[0]} {words[1]} and the {words[2]} {words[3]}, ticket {n}."

    @staticmethod
    def base(n: int) -> str:
        return f"How do I change my {TOPICS[n % len(TOPICS)]}, case {n}?"

    @staticmethod
    def paraphrase(n: int) -> str:
        return f"How can I change my {TOPICS[n % len(TOPICS)]}, case {n}?"

    @staticmethod
    def near(n: int) -> str:
        return f"How do I clean my {OTHER_TOPICS[n % len(OTHER_TOPICS)]}, case {n}?"

    @staticmethod
    def exact(n: int) -> str:
        return f"Summarise the benchmark's standing note number {n} in one line."


# --- targets -------------------------------------------------------------------------------


@dataclass
class Outcome:
    ok: bool
    latency_s: float
    first_token_s: float | None = None
    error: str = ""


Call = Callable[[str, bool, bool], Awaitable[Outcome]]
"""(prompt, stream, exact_only) -> how the call went."""
EXACT_ONLY = {"x-strata-cache": "exact-only"}


def _body(prompt: str, stream: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body


def http_call(client: httpx.AsyncClient) -> Call:
    """One chat completion over the OpenAI HTTP API (unary, or streamed and read to the end)."""

    async def call(prompt: str, stream: bool, exact_only: bool) -> Outcome:
        headers = EXACT_ONLY if exact_only else None
        started = time.perf_counter()
        try:
            if not stream:
                response = await client.post(
                    "/v1/chat/completions", json=_body(prompt, False), headers=headers
                )
                elapsed = time.perf_counter() - started
                if response.status_code != 200:
                    return Outcome(False, elapsed, error=f"HTTP {response.status_code}")
                if not response.json()["choices"][0]["message"]["content"]:
                    return Outcome(False, elapsed, error="empty answer")
                return Outcome(True, elapsed)
            first: float | None = None
            done = False
            async with client.stream(
                "POST", "/v1/chat/completions", json=_body(prompt, True), headers=headers
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                    return Outcome(
                        False, time.perf_counter() - started, error=f"HTTP {response.status_code}"
                    )
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        done = True
                        break
                    if first is None and '"content"' in data:
                        choices = json.loads(data).get("choices") or [{}]
                        if (choices[0].get("delta") or {}).get("content"):
                            first = time.perf_counter() - started
            elapsed = time.perf_counter() - started
            if not done or first is None:
                return Outcome(False, elapsed, first, "stream ended without [DONE] or content")
            return Outcome(True, elapsed, first)
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as err:
            return Outcome(False, time.perf_counter() - started, error=type(err).__name__)

    return call


def request_fields(prompt: str, exact_only: bool) -> dict[str, Any]:
    """The fields of the benchmark's Generate (and StreamGenerate) request for `prompt`."""
    return {
        "model": MODEL,
        "messages": [common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=prompt)],
        "params": common_pb2.GenerationParams(temperature=0),
        "cache_policy": common_pb2.CachePolicy(semantic_disabled=exact_only),
    }


def grpc_call(stub: orchestrator_pb2_grpc.OrchestratorServiceStub, key: str) -> Call:
    """One Generate, or one StreamGenerate read to its final chunk."""
    metadata = (("authorization", f"Bearer {key}"),)

    async def call(prompt: str, stream: bool, exact_only: bool) -> Outcome:
        fields = request_fields(prompt, exact_only)
        started = time.perf_counter()
        try:
            if not stream:
                answer = await stub.Generate(
                    orchestrator_pb2.GenerateRequest(**fields), metadata=metadata, timeout=60
                )
                elapsed = time.perf_counter() - started
                return Outcome(bool(answer.text), elapsed, error="" if answer.text else "empty")
            first: float | None = None
            done = False
            async for chunk in stub.StreamGenerate(
                orchestrator_pb2.StreamGenerateRequest(**fields),
                metadata=metadata,
                timeout=60,
            ):
                kind = chunk.WhichOneof("chunk")
                if kind == "delta" and first is None and chunk.delta.text:
                    first = time.perf_counter() - started
                elif kind == "final":
                    done = True
            elapsed = time.perf_counter() - started
            if not done or first is None:
                return Outcome(False, elapsed, first, "stream ended without final or content")
            return Outcome(True, elapsed, first)
        except grpc.aio.AioRpcError as err:
            return Outcome(False, time.perf_counter() - started, error=err.code().name)

    return call


@dataclass
class Target:
    """Something the load is sent to, and the process trees that serve it."""

    name: str
    call: Call
    parts: dict[str, int]
    """Process-tree roots by part name (`upstream`, `gateway`, …, `litellm`)."""
    cached: bool
    """Whether it has a cache (priming it is worth the time)."""


# --- measuring -----------------------------------------------------------------------------


@dataclass
class RoundResult:
    scenario: str
    concurrency: int
    round: int
    target: str
    requests: int
    errors: int
    first_error: str
    wall_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    throughput_rps: float
    upstream_calls_per_request: float
    cpu_ms_per_request: dict[str, float]
    rss_mib: dict[str, float]


def cpu_of(parts: dict[str, int]) -> dict[str, float]:
    return {name: procs.cpu_seconds(procs.tree(pid)) for name, pid in parts.items()}


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def upstream_served(client: httpx.AsyncClient) -> int:
    response = await client.get("/stats")
    return int(response.json()["served"])


async def drive(
    call: Call,
    prompts: Sequence[str],
    scenario: Scenario,
    concurrency: int,
    cap_s: float,
) -> tuple[list[Outcome], float]:
    """Sends the prompts with `concurrency` requests in flight; stops issuing after `cap_s`."""
    outcomes: list[Outcome] = []
    position = 0
    started = time.perf_counter()
    deadline = started + cap_s

    async def worker() -> None:
        nonlocal position
        while position < len(prompts) and time.perf_counter() < deadline:
            prompt = prompts[position]
            position += 1
            outcomes.append(await call(prompt, scenario.stream, scenario.exact_only))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, time.perf_counter() - started


def ms(values: Sequence[float], share: float) -> float:
    return percentile(values, share) * 1000 if values else float("nan")


# --- the run -------------------------------------------------------------------------------


@dataclass
class Run:
    args: argparse.Namespace
    targets: list[Target]
    upstream: httpx.AsyncClient
    prompts: Prompts = field(default_factory=lambda: Prompts(7))
    results: list[RoundResult] = field(default_factory=list)

    def questions(self, scenario: Scenario, size: int, exact_n: int) -> tuple[list[str], list[str]]:
        """The round's questions, and those to store first (`paraphrase`, `near`) or []."""
        first = self.prompts.block(size)
        serials = range(first, first + size)
        if scenario.prompts == "unique":
            return [self.prompts.unique(n) for n in serials], []
        if scenario.prompts == "exact":
            return [self.prompts.exact(exact_n)] * size, []
        bases = [Prompts.base(n) for n in serials]
        if scenario.prompts == "paraphrase":
            return [Prompts.paraphrase(n) for n in serials], bases
        return [Prompts.near(n) for n in serials], bases

    async def prime(self, target: Target, bases: list[str], c: int) -> None:
        """Stores the questions the timed requests paraphrase (or ask near), untimed."""
        if not bases or not target.cached:
            return
        priming = Scenario("prime", stream=False, prompts="exact")
        outcomes, _ = await drive(target.call, bases, priming, c, self.args.round_cap_s)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            print(f"    priming {target.name}: {len(failed)} failed", file=sys.stderr)

    async def one_round(
        self, scenario: Scenario, c: int, number: int, target: Target, exact_n: int
    ) -> RoundResult:
        n = self.args.requests
        questions, bases = self.questions(scenario, n, exact_n)
        await self.prime(target, bases, c)
        before_upstream = await upstream_served(self.upstream)
        before_cpu = cpu_of(target.parts)
        before_self = self_cpu_s()
        outcomes, wall = await drive(target.call, questions, scenario, c, self.args.round_cap_s)
        after_self = self_cpu_s()
        after_cpu = cpu_of(target.parts)
        upstream_calls = await upstream_served(self.upstream) - before_upstream
        done = len(outcomes)
        good = [o for o in outcomes if o.ok]
        latencies = [o.latency_s for o in good]
        ttfts = [o.first_token_s for o in good if o.first_token_s is not None]
        cpu = {
            name: (after_cpu[name] - before_cpu[name]) * 1000 / max(1, done) for name in after_cpu
        }
        cpu["load generator"] = (after_self - before_self) * 1000 / max(1, done)
        rss = {name: procs.rss_bytes(procs.tree(pid)) / 2**20 for name, pid in target.parts.items()}
        errors = [o for o in outcomes if not o.ok]
        return RoundResult(
            scenario=scenario.name,
            concurrency=c,
            round=number,
            target=target.name,
            requests=done,
            errors=len(errors),
            first_error=errors[0].error if errors else "",
            wall_s=wall,
            p50_ms=ms(latencies, 0.5),
            p90_ms=ms(latencies, 0.9),
            p99_ms=ms(latencies, 0.99),
            ttft_p50_ms=ms(ttfts, 0.5) if scenario.stream else None,
            ttft_p90_ms=ms(ttfts, 0.9) if scenario.stream else None,
            throughput_rps=len(good) / wall if wall > 0 else 0.0,
            upstream_calls_per_request=upstream_calls / max(1, done),
            cpu_ms_per_request=cpu,
            rss_mib=rss,
        )

    async def warm(self, scenario: Scenario, c: int, target: Target, exact_n: int) -> None:
        """Untimed requests: connections opened, code paths warm, the exact answer stored."""
        size = max(self.args.warmup, c)
        questions, bases = self.questions(scenario, size, exact_n)
        await self.prime(target, bases, c)
        await drive(target.call, questions, scenario, c, self.args.round_cap_s)

    async def run(self) -> None:
        for scenario_name in self.args.scenarios:
            scenario = SCENARIOS[scenario_name]
            for c in self.args.concurrency:
                exact = {t.name: self.prompts.block(1) for t in self.targets}
                for target in self.targets:
                    await self.warm(scenario, c, target, exact[target.name])
                for number in range(self.args.rounds):
                    shift = number % len(self.targets)
                    order = self.targets[shift:] + self.targets[:shift]
                    for target in order:
                        result = await self.one_round(
                            scenario, c, number + 1, target, exact[target.name]
                        )
                        self.results.append(result)
                        errors = f"  {result.errors} errors ({result.first_error})"
                        print(
                            f"[{scenario.name} c={c} round {number + 1}/{self.args.rounds}] "
                            f"{target.name:<17} p50 {result.p50_ms:8.2f} ms  "
                            f"p99 {result.p99_ms:8.2f} ms  {result.throughput_rps:7.1f} req/s"
                            f"  upstream/req {result.upstream_calls_per_request:.2f}"
                            + (errors if result.errors else ""),
                            file=sys.stderr,
                        )


# --- starting things -----------------------------------------------------------------------


@contextmanager
def upstream_process(run_dir: Path, args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """bench/upstream.py as a process; yields its base URL and pid."""
    port_file = run_dir / "upstream.port"
    log_path = run_dir / "logs" / "upstream.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "bench.upstream",
        "--port-file",
        str(port_file),
        "--chunks",
        str(args.chunks),
        "--chunk-delay-ms",
        str(args.chunk_delay_ms),
        "--first-delay-ms",
        str(args.first_delay_ms),
    ]
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise StackError(f"the upstream did not start; see {log_path}")
            time.sleep(0.02)
        base = f"http://127.0.0.1:{int(port_file.read_text())}"
        wait_http_ok(f"{base}/health", 30, process)
        yield base, process.pid
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def strata_on_upstream(
    run_dir: Path, args: argparse.Namespace, tenant: str
) -> Iterator[tuple[LocalStack, str]]:
    """The local upstream and Strata's four services on it (each its own process) with one
    tenant, for the benchmarks that drive one stack; yields the stack and the tenant's key."""
    with ExitStack() as stack:
        upstream_base, _ = stack.enter_context(upstream_process(run_dir, args))
        redis_url = stack.enter_context(bench_redis())
        keys, tenants = tenants_file(run_dir, [tenant])
        local = LocalStack(
            run_dir=run_dir / "strata",
            models_file=models_file(run_dir, upstream_base),
            tenants_file=tenants,
            redis_url=redis_url,
        )
        print("==> starting Strata", file=sys.stderr)
        local.start(timeout_s=120)
        stack.callback(local.stop)
        yield local, keys[tenant]


def models_file(directory: Path, upstream_base: str) -> Path:
    """config/models.yaml plus `bench`, served by the local upstream."""
    catalog = yaml.safe_load((ROOT / "config" / "models.yaml").read_text())
    catalog["providers"]["bench-upstream"] = {
        "kind": "openai_compatible",
        "base_url": f"{upstream_base}/v1",
    }
    catalog["models"][MODEL] = {
        "provider": "bench-upstream",
        "upstream_model": MODEL,
        "input_usd_per_million_tokens": "0",
        "output_usd_per_million_tokens": "0",
        "max_output_tokens": 1024,
        "context_window": 32_000,
        "retry": {"max_attempts": 1},
        "timeouts": {"first_token_s": 30.0, "stall_s": 30.0},
    }
    path = directory / "models.yaml"
    path.write_text(yaml.safe_dump(catalog))
    return path


def tenants_file(directory: Path, tenants: Sequence[str]) -> tuple[dict[str, str], Path]:
    """One tenant per stack (no answer stored by one serves another), each with a key whose
    limits the benchmark never reaches; the keys by tenant, and the file."""
    keys, entries = {}, {}
    for tenant in tenants:
        key, digest = new_key()
        keys[tenant] = key
        entries[tenant] = {
            "keys": [{"id": f"{tenant}-main", "sha256": digest, "requests_per_minute": 100_000_000}]
        }
    path = directory / "tenants.yaml"
    path.write_text(yaml.safe_dump({"tenants": entries}))
    return keys, path


def ensure_matplotlib() -> Path | None:
    """A virtualenv with matplotlib under bench/.work (once); its python, or None."""
    python = PLOT_VENV / "bin" / "python"
    marker = PLOT_VENV / f".installed-matplotlib-{MATPLOTLIB_VERSION}"
    if marker.exists():
        return python
    print(f"==> installing matplotlib into {PLOT_VENV} (once)", file=sys.stderr)
    try:
        if not python.exists():
            venv.EnvBuilder(with_pip=True, clear=True).create(PLOT_VENV)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             f"matplotlib=={MATPLOTLIB_VERSION}"],
            check=True,
            timeout=900,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as err:
        print(f"    no chart: matplotlib could not be installed ({err})", file=sys.stderr)
        return None
    marker.write_text("ok\n")
    return python


# --- reporting -----------------------------------------------------------------------------


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and v == v]
    return statistics.median(present) if present else None


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


@dataclass
class Summary:
    """Medians over the rounds of one scenario, concurrency and target."""

    scenario: str
    concurrency: int
    target: str
    rounds: int
    requests: int
    errors: int
    values: dict[str, float | None]
    added: dict[str, float | None]
    cpu: dict[str, float | None]


def summarise(results: Sequence[RoundResult]) -> list[Summary]:
    by_key: dict[tuple[str, int, str], list[RoundResult]] = {}
    for r in results:
        by_key.setdefault((r.scenario, r.concurrency, r.target), []).append(r)
    direct = {(r.scenario, r.concurrency, r.round): r for r in results if r.target == "direct"}
    metrics = ("p50_ms", "p90_ms", "p99_ms", "ttft_p50_ms", "ttft_p90_ms", "throughput_rps")
    summaries = []
    for (scenario, c, target), rounds in by_key.items():
        values = {m: _median([getattr(r, m) for r in rounds]) for m in metrics}
        values["upstream_calls_per_request"] = _median(
            [r.upstream_calls_per_request for r in rounds]
        )
        added: dict[str, float | None] = {}
        for m in ("p50_ms", "p90_ms", "p99_ms", "ttft_p50_ms"):
            deltas: list[float | None] = []
            for r in rounds:
                base = None if target == "direct" else direct.get((scenario, c, r.round))
                mine, theirs = getattr(r, m), getattr(base, m) if base else None
                deltas.append(None if mine is None or theirs is None else mine - theirs)
            added[m] = _median(deltas)
        parts = sorted({p for r in rounds for p in r.cpu_ms_per_request})
        cpu = {p: _median([r.cpu_ms_per_request.get(p) for r in rounds]) for p in parts}
        summaries.append(
            Summary(
                scenario,
                c,
                target,
                len(rounds),
                sum(r.requests for r in rounds),
                sum(r.errors for r in rounds),
                values,
                added,
                cpu,
            )
        )
    return summaries


def markdown(
    summaries: Sequence[Summary],
    results: Sequence[RoundResult],
    context: dict[str, str],
    chart: str | None,
    unavailable: dict[str, str],
) -> str:
    lines = [f"Run on {context['date']}.", ""]
    if context.get("smoke"):
        lines += [f"> **{context['smoke']}**", ""]
    lines += [
        f"- Machine: {context['machine']}",
        f"- Python {context['python']}; Strata at {context['commit']}; "
        f"peer litellm[proxy]=={LITELLM_VERSION}",
        f"- Command: `{context['command']}`",
        f"- Settings: {context['settings']}",
        f"- Raw rounds (JSON): `{context['raw']}`",
    ]
    for name, reason in unavailable.items():
        first_line = reason.strip().splitlines()[0] if reason.strip() else "unknown"
        lines.append(f"- **{name} unavailable**: {first_line}")
    if chart:
        lines += ["", f"![added latency against concurrency]({chart})"]
    for scenario in dict.fromkeys(s.scenario for s in summaries):
        rows = [s for s in summaries if s.scenario == scenario]
        stream = SCENARIOS[scenario].stream
        lines += ["", f"### {scenario}", ""]
        head = "| c | target | p50 ms | p90 ms | p99 ms | added p50 | added p90 | added p99 |"
        rule = "|---:|---|---:|---:|---:|---:|---:|---:|"
        if stream:
            head += " TTFT p50 | added TTFT p50 |"
            rule += "---:|---:|"
        head += " req/s | upstream/req | errors |"
        rule += "---:|---:|---:|"
        lines += [head, rule]
        for s in sorted(rows, key=lambda s: (s.concurrency, ALL_TARGETS.index(s.target))):
            v, a = s.values, s.added
            row = (
                f"| {s.concurrency} | {s.target} | {_fmt(v['p50_ms'])} | {_fmt(v['p90_ms'])} | "
                f"{_fmt(v['p99_ms'])} | {_fmt(a['p50_ms'])} | {_fmt(a['p90_ms'])} | "
                f"{_fmt(a['p99_ms'])} |"
            )
            if stream:
                row += f" {_fmt(v['ttft_p50_ms'])} | {_fmt(a['ttft_p50_ms'])} |"
            row += (
                f" {_fmt(v['throughput_rps'], 1)} | {_fmt(v['upstream_calls_per_request'])} |"
                f" {s.errors}/{s.requests} |"
            )
            lines.append(row)
    parts = ["upstream", *STRATA_PARTS, "litellm", "load generator"]
    lines += [
        "",
        "### CPU ms per request (median of rounds; each process tree)",
        "",
        "| scenario | c | target | " + " | ".join(parts) + " | total (no upstream) |",
        "|---|---:|---|" + "---:|" * (len(parts) + 1),
    ]
    order = list(SCENARIOS)
    for s in sorted(
        summaries,
        key=lambda s: (order.index(s.scenario), s.concurrency, ALL_TARGETS.index(s.target)),
    ):
        cells = [_fmt(s.cpu.get(p)) if p in s.cpu else "" for p in parts]
        total = sum(v for p, v in s.cpu.items() if p not in ("upstream", "load generator") and v)
        lines.append(
            f"| {s.scenario} | {s.concurrency} | {s.target} | "
            + " | ".join(cells)
            + f" | {total:.2f} |"
        )
    peak: dict[tuple[str, str], float] = {}
    for r in results:
        for part, mib in r.rss_mib.items():
            owner = (
                "shared"
                if part == "upstream"
                else r.target.replace("-grpc", "-*").replace("-http", "-*")
            )
            peak[(owner, part)] = max(peak.get((owner, part), 0.0), mib)
    lines += [
        "",
        "### Resident memory, MiB (largest seen after a round; process tree)",
        "",
        "| stack | process | RSS MiB |",
        "|---|---|---:|",
    ]
    lines += [f"| {o} | {p} | {mib:.0f} |" for (o, p), mib in sorted(peak.items())]
    lines += [
        "",
        "<details><summary>Every round</summary>",
        "",
        "| scenario | c | round | target | n | err | p50 | p90 | p99 | TTFT p50 | req/s | up/req |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.scenario} | {r.concurrency} | {r.round} | {r.target} | {r.requests} | "
            f"{r.errors} | {_fmt(r.p50_ms)} | {_fmt(r.p90_ms)} | {_fmt(r.p99_ms)} | "
            f"{_fmt(r.ttft_p50_ms)} | {r.throughput_rps:.1f} | "
            f"{r.upstream_calls_per_request:.2f} |"
        )
    lines += ["", "</details>"]
    return "\n".join(lines)


def write_results(path: Path, section: str) -> None:
    """Replaces the part of `path` between the markers (the rest is kept as written)."""
    text = path.read_text() if path.exists() else f"# Gateway overhead\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")


def draw_chart(summaries: Sequence[Summary], path: Path, title: str) -> bool:
    """A PNG of added p50 latency (and p99, dashed) against concurrency, one panel per scenario."""
    python = ensure_matplotlib()
    if python is None:
        return False
    data = [
        {
            "scenario": s.scenario,
            "concurrency": s.concurrency,
            "target": s.target,
            "p50": s.added["p50_ms"],
            "p99": s.added["p99_ms"],
        }
        for s in summaries
        if s.target != "direct"
    ]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump({"title": title, "points": data}, handle)
    done = subprocess.run(
        [str(python), str(ROOT / "bench" / "chart.py"), handle.name, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        print(f"    no chart: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return False
    return True


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head}{' (with local changes)' if dirty else ''}" if head else "unknown"


# --- main ----------------------------------------------------------------------------------


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [kind(part) for part in text.split(",") if part]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=_csv(int), default=[1, 4, 16, 64])
    parser.add_argument("--requests", type=int, default=400, help="per target, round and level")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (>= 3)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per level")
    parser.add_argument("--scenarios", type=_csv(str), default=list(SCENARIOS))
    parser.add_argument("--targets", type=_csv(str), default=list(ALL_TARGETS))
    parser.add_argument("--chunks", type=int, default=20, help="pieces of each upstream answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--first-delay-ms", type=float, default=0.0)
    parser.add_argument(
        "--round-cap-s", type=float, default=300.0, help="no new requests after this long"
    )
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "RESULTS.md")
    parser.add_argument("--chart", type=Path, help="default: gateway_overhead.png by --results")
    parser.add_argument("--no-peer", action="store_true", help="skip the LiteLLM proxy")
    args = parser.parse_args(argv)
    for name in args.scenarios:
        if name not in SCENARIOS:
            parser.error(f"unknown scenario {name!r}; one of {', '.join(SCENARIOS)}")
    for name in args.targets:
        if name not in ALL_TARGETS:
            parser.error(f"unknown target {name!r}; one of {', '.join(ALL_TARGETS)}")
    if "direct" not in args.targets:
        args.targets.insert(0, "direct")
    if args.no_peer:
        args.targets = [t for t in args.targets if not t.startswith("litellm")]
    return args


async def benchmark(
    args: argparse.Namespace,
    upstream_base: str,
    parts: dict[str, dict[str, int]],
    stacks: dict[str, LocalStack],
    keys: dict[str, str],
    peers: dict[str, LiteLLMProxy],
) -> list[RoundResult]:
    concurrency = max(args.concurrency)

    def http_client(base_url: str, **headers: str) -> httpx.AsyncClient:
        # httpx over aiohttp, as the executor calls upstreams: httpx's own transport
        # (httpcore) is the bottleneck from about 64 connections on (on 2 cores: 70-80
        # requests/s and p99 3-4 s against 540/s and 0.13 s), which would measure this client
        # rather than the direct path, Strata's HTTP door or the peer.
        # Idle connections are dropped after 2 s, before any server's keep-alive ends (5 s
        # in uvicorn's default, LiteLLM's server): a request sent on a connection that the
        # server is closing at that moment would fail (RemoteProtocolError).
        limits = httpx.Limits(
            max_connections=concurrency,
            max_keepalive_connections=concurrency,
            keepalive_expiry=2.0,
        )
        return httpx.AsyncClient(
            base_url=base_url,
            transport=AiohttpTransport(limits),
            timeout=httpx.Timeout(60.0),
            headers=headers,
        )

    async with Connections() as scope:
        upstream_client = await scope.client(httpx.AsyncClient(base_url=upstream_base))
        targets: list[Target] = []
        for name in args.targets:
            if name == "direct":
                client = await scope.client(http_client(upstream_base))
                targets.append(Target(name, http_call(client), parts["direct"], False))
            elif name.startswith("strata"):
                config = "on" if name.endswith("+otel") else "off"
                addresses = stacks[config].addresses
                if "-http" in name:
                    client = await scope.client(
                        http_client(
                            f"http://{addresses['gateway']}",
                            authorization=f"Bearer {keys[config]}",
                        )
                    )
                    call = http_call(client)
                    tree = parts[config]
                else:
                    channel = scope.channel(grpc.aio.insecure_channel(addresses["orchestrator"]))
                    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
                    call = grpc_call(stub, keys[config])
                    tree = {k: v for k, v in parts[config].items() if k != "gateway"}
                targets.append(Target(name, call, tree, True))
            elif name in peers:
                client = await scope.client(http_client(peers[name].base_url))
                targets.append(Target(name, http_call(client), parts[name], False))
        run = Run(args, targets, upstream_client)
        await run.run()
        return run.results


class Connections:
    """Closes the benchmark's HTTP clients and gRPC channels at the end."""

    def __init__(self) -> None:
        self._clients: list[httpx.AsyncClient] = []
        self._channels: list[grpc.aio.Channel] = []

    async def __aenter__(self) -> Connections:
        return self

    async def __aexit__(self, *_: object) -> None:
        for client in self._clients:
            await client.aclose()
        for channel in self._channels:
            await channel.close()

    async def client(self, client: httpx.AsyncClient) -> httpx.AsyncClient:
        self._clients.append(client)
        return client

    def channel(self, channel: grpc.aio.Channel) -> grpc.aio.Channel:
        self._channels.append(channel)
        return channel


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started_at = datetime.datetime.now(datetime.UTC)
    commit = git_commit()  # before the run rewrites the chart beside the results
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    WORK.mkdir(parents=True, exist_ok=True)
    unavailable: dict[str, str] = {}
    with ExitStack() as stack:
        # Kept after the run (its logs say what went wrong); the next run clears it.
        run_dir = WORK / "last-run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        print(f"==> run directory {run_dir} (logs under */logs/)", file=sys.stderr)
        upstream_base, upstream_pid = stack.enter_context(upstream_process(run_dir, args))
        print(f"==> upstream at {upstream_base}", file=sys.stderr)
        parts: dict[str, dict[str, int]] = {"direct": {"upstream": upstream_pid}}
        configs = sorted(
            {"on" if t.endswith("+otel") else "off" for t in args.targets if t.startswith("strata")}
        )
        stacks: dict[str, LocalStack] = {}
        keys: dict[str, str] = {}
        if configs:
            redis_url = stack.enter_context(bench_redis())
            receiver = stack.enter_context(OtlpReceiver()) if "on" in configs else None
            catalog = models_file(run_dir, upstream_base)
            # Tenants new to this run: Redis outlives runs, and answers stored by an earlier
            # run (same questions) would turn this run's misses into hits.
            names = {c: f"bench-{c}-{stamp.lower()}" for c in configs}
            by_tenant, tenants = tenants_file(run_dir, list(names.values()))
            keys = {c: by_tenant[names[c]] for c in configs}
            for config in configs:
                env = {}
                if config == "on" and receiver is not None:
                    env = {
                        f"STRATA_{s.upper()}_OTLP_ENDPOINT": receiver.endpoint
                        for s in (*SERVICES, "gateway")
                    }
                print(f"==> starting Strata (tracing {config})", file=sys.stderr)
                local = LocalStack(
                    run_dir=run_dir / f"strata-{config}",
                    models_file=catalog,
                    tenants_file=tenants,
                    redis_url=redis_url,
                    env=env,
                    gateway=True,
                )
                local.start(timeout_s=120)
                stack.callback(local.stop)
                stacks[config] = local
                tree = {"upstream": upstream_pid}
                for part in STRATA_PARTS:
                    process = local.services[part].process
                    assert process is not None
                    tree[part] = process.pid
                parts[config] = tree
        peers: dict[str, LiteLLMProxy] = {}
        wanted = [t for t in args.targets if t.startswith("litellm")]
        if wanted:
            try:
                executable = ensure_installed()
                for name in wanted:
                    workers = int(name.split("-")[1].rstrip("w"))
                    print(f"==> starting {name}", file=sys.stderr)
                    proxy = LiteLLMProxy(
                        executable, run_dir / "peer", f"{upstream_base}/v1", [MODEL], workers
                    )
                    try:
                        proxy.start()
                    except PeerUnavailable as err:
                        unavailable[name] = str(err)
                        print(f"    {name} unavailable: {err}", file=sys.stderr)
                        continue
                    stack.callback(proxy.stop)
                    peers[name] = proxy
                    parts[name] = {"upstream": upstream_pid, "litellm": proxy.pid}
            except PeerUnavailable as err:
                for name in wanted:
                    unavailable[name] = str(err)
                print(f"    the peer is unavailable: {err}", file=sys.stderr)
            args.targets = [t for t in args.targets if not t.startswith("litellm") or t in peers]
        print(
            f"==> targets {', '.join(args.targets)}; scenarios {', '.join(args.scenarios)}; "
            f"concurrency {args.concurrency}; {args.requests} requests x {args.rounds} rounds",
            file=sys.stderr,
        )
        results = asyncio.run(benchmark(args, upstream_base, parts, stacks, keys, peers))
    raw = WORK / f"gateway-overhead-{stamp}.json"
    raw.write_text(json.dumps([asdict(r) for r in results], indent=1))
    summaries = summarise(results)
    smoke = ""
    if args.rounds < 3 or args.requests < 100:
        smoke = (
            f"SMOKE RUN ({args.requests} requests x {args.rounds} rounds): proves the harness "
            "works; not numbers to compare."
        )
    chart_path = args.chart or args.results.with_name("gateway_overhead.png")
    title = (
        f"Added latency over direct upstream ({started_at:%Y-%m-%d}{', smoke' if smoke else ''})"
    )
    chart = draw_chart(summaries, chart_path, title)
    context = {
        "date": f"{started_at:%Y-%m-%d %H:%M} UTC",
        "machine": f"{procs.machine()}; {platform.platform()}",
        "python": platform.python_version(),
        "commit": commit,
        "command": " ".join(["python -m bench.gateway_overhead", *(argv or sys.argv[1:])]),
        "settings": (
            f"concurrency {args.concurrency}, {args.requests} requests per target per round, "
            f"{args.rounds} rounds, warm-up {args.warmup}, upstream answers {args.chunks} "
            f"chunks, first delay {args.first_delay_ms} ms, chunk delay {args.chunk_delay_ms} ms"
        ),
        "raw": str(raw.relative_to(ROOT)) if raw.is_relative_to(ROOT) else str(raw),
        "smoke": smoke,
    }
    relative_chart = (
        str(chart_path.relative_to(args.results.parent))
        if chart_path.is_relative_to(args.results.parent)
        else str(chart_path)
    )
    section = markdown(summaries, results, context, relative_chart if chart else None, unavailable)
    write_results(args.results, section)
    print(f"==> results in {args.results}; rounds in {raw}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
