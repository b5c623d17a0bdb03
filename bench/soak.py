"""Does any service's memory grow with the number of requests? A long run, RSS sampled.

    make bench-soak                      # 500k requests, about 45 min on 2 cores
    .venv/bin/python -m bench.soak [--requests 500000] [--concurrency 16] [--samples 20]
        [--results bench/RESULTS.md]

Starts the local upstream and Strata's four services (each its own process), then sends
`--requests` requests over gRPC at `--concurrency`: a mix of new questions answered unary
(exact reuse only: admission, exact miss, executor, store, settlement), the same for
streams, and repeats that the cache answers. Reads each service's resident memory (RSS,
from /proc) `--samples` times along the way. Growth is measured from the first sample
after the warm-up share (`--warmup`, 10% by default: pools, caches and allocator arenas
fill first) to the last; the target is at most 5%.

Results go between the soak markers of `--results` and every sample as JSON under
bench/.work/.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench import procs
from bench.gateway_overhead import (
    SCENARIOS,
    STRATA_PARTS,
    WORK,
    Prompts,
    git_commit,
    grpc_call,
    strata_on_upstream,
)
from strata.orchestrator.v1 import orchestrator_pb2_grpc

BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
MIX = (("unary-exact-miss", 4), ("stream-exact-miss", 1), ("exact-hit", 5))
"""Scenarios and their weights in every ten requests."""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=500_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--warmup", type=float, default=0.1, help="share before the baseline")
    parser.add_argument("--results", type=Path, default=Path("bench/RESULTS.md"))
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--first-delay-ms", type=float, default=0.0)
    return parser.parse_args(argv)


def rss_mib(parts: dict[str, int]) -> dict[str, float]:
    return {name: procs.rss_bytes(procs.tree(pid)) / 2**20 for name, pid in parts.items()}


async def soak(address: str, key: str, args: argparse.Namespace, parts: dict[str, int]) -> dict:
    plan = [name for name, weight in MIX for _ in range(weight)]
    prompts = Prompts(seed=int(time.time()))
    every = max(1, args.requests // args.samples)
    samples: list[dict] = []
    errors: dict[str, int] = {}
    sent = done = 0
    started = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        call = grpc_call(orchestrator_pb2_grpc.OrchestratorServiceStub(channel), key)

        async def worker() -> None:
            nonlocal sent, done
            while sent < args.requests:
                n = sent
                sent += 1
                scenario = SCENARIOS[plan[n % len(plan)]]
                prompt = prompts.exact(n % 50) if scenario.prompts == "exact" else prompts.unique(n)
                outcome = await call(prompt, scenario.stream, scenario.exact_only)
                if not outcome.ok:
                    errors[outcome.error] = errors.get(outcome.error, 0) + 1
                done += 1
                if done % every == 0:
                    elapsed = time.perf_counter() - started
                    now = rss_mib(parts)
                    samples.append({"requests": done, "elapsed_s": elapsed, "rss_mib": now})
                    rss = ", ".join(f"{k} {v:.0f}" for k, v in now.items())
                    print(
                        f"    {done:>8} requests  {done / elapsed:6.0f}/s  "
                        f"errors {sum(errors.values())}  RSS MiB: {rss}",
                        file=sys.stderr,
                    )

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return {"samples": samples, "errors": errors, "wall_s": time.perf_counter() - started}


def growth(samples: list[dict], warmup: float, total: int) -> dict[str, tuple[float, float]]:
    """(baseline MiB, growth %) per service: from the first sample past the warm-up."""
    base = next((s for s in samples if s["requests"] >= warmup * total), samples[0])
    last = samples[-1]
    return {
        name: (base["rss_mib"][name], 100 * (last["rss_mib"][name] / base["rss_mib"][name] - 1))
        for name in base["rss_mib"]
    }


def markdown(args: argparse.Namespace, result: dict, started: datetime.datetime) -> str:
    samples = result["samples"]
    grown = growth(samples, args.warmup, args.requests)
    lines = [
        f"Run on {started:%Y-%m-%d %H:%M} UTC, Strata at {git_commit()}: {procs.machine()}.",
        "",
        f"- Command: `python -m bench.soak {' '.join(sys.argv[1:])}`".rstrip(),
        f"- {args.requests} requests at concurrency {args.concurrency} in "
        f"{result['wall_s'] / 60:.1f} min ({args.requests / result['wall_s']:.0f}/s); "
        f"mix per ten: {', '.join(f'{w} {n}' for n, w in MIX)}; "
        f"errors: {result['errors'] or 'none'}",
        "",
        "| service | RSS MiB after warm-up | RSS MiB at the end | growth | target ≤ 5% |",
        "|---|---:|---:|---:|---|",
    ]
    for name, (base, percent) in grown.items():
        end = samples[-1]["rss_mib"][name]
        verdict = "met" if percent <= 5 else "**missed**"
        lines.append(f"| {name} | {base:.1f} | {end:.1f} | {percent:+.1f}% | {verdict} |")
    lines += ["", "RSS MiB along the run:", ""]
    names = list(samples[0]["rss_mib"])
    lines.append(f"| requests | {' | '.join(names)} |")
    lines.append(f"|---:|{'---:|' * len(names)}")
    for sample in samples:
        cells = " | ".join(f"{sample['rss_mib'][n]:.1f}" for n in names)
        lines.append(f"| {sample['requests']} | {cells} |")
    return "\n".join(lines)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = f"{head}{BEGIN}\n{section}\n{END}{rest.split(END, 1)[1]}"
    else:
        text = f"{text.rstrip()}\n\n## Memory over a long run\n\n{BEGIN}\n{section}\n{END}\n"
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    run_dir = WORK / "soak"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    with strata_on_upstream(run_dir, args, f"soak-{started:%Y%m%dt%H%M%S}") as (local, key):
        parts = {}
        for part in (p for p in STRATA_PARTS if p in local.services):
            process = local.services[part].process
            assert process is not None
            parts[part] = process.pid
        print(
            f"==> {args.requests} requests at c={args.concurrency}, RSS every "
            f"{max(1, args.requests // args.samples)}",
            file=sys.stderr,
        )
        result = asyncio.run(soak(local.addresses["orchestrator"], key, args, parts))
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    (WORK / f"soak-{stamp}.json").write_text(json.dumps(result, indent=1))
    section = markdown(args, result, started)
    write_section(args.results, section)
    print(section)
    grown = growth(result["samples"], args.warmup, args.requests)
    return 0 if all(percent <= 5 for _, percent in grown.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
