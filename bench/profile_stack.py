"""Where each service spends its CPU on the request path: py-spy profiles under load.

    make profile
    .venv/bin/python -m bench.profile_stack [--scenario unary-exact-miss] [--concurrency 4]
        [--seconds 20] [--rate 100] [--out bench/.work/profile] [--perf]

Starts the local upstream and Strata's four services (each its own process, as in
`make bench`), drives one scenario of bench/gateway_overhead.py over gRPC at a fixed
concurrency, and meanwhile samples every service with py-spy (installed once into a
virtualenv of its own under bench/.work/, never a project dependency). Writes, per service,
the collapsed stacks (`<service>.txt`, for flamegraph.pl or speedscope), and prints the
functions with the most samples, counting a function once per stack (inclusive) and where
the sample was taken (self), so the top of the list says where the time goes.

py-spy reads Python stacks: time spent in C (grpc's Cython layer, the kernel, protobuf) shows
up as the Python frame that called it, often the event loop's own `Runner.run`, and its
native mode counts threads blocked in `epoll_wait` as busy. `--perf` samples CPU time
instead, with Linux perf (`perf record -p`; it needs perf installed and the right to profile
other processes: root, or kernel.perf_event_paranoid at most 1), and prints each service's
CPU by shared object (the interpreter, the kernel, grpc, protobuf...) and by symbol;
`<service>.perf` holds the samples for `perf report -i`.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import time
import venv
from collections.abc import Sequence
from pathlib import Path

import grpc

from bench.gateway_overhead import (
    SCENARIOS,
    STRATA_PARTS,
    WORK,
    Prompts,
    drive,
    grpc_call,
    strata_on_upstream,
)
from strata.orchestrator.v1 import orchestrator_pb2_grpc

PYSPY_VERSION = "0.4.3"
PYSPY_VENV = WORK / "pyspy-venv"


def ensure_pyspy() -> Path:
    """py-spy in its own virtualenv under bench/.work (once); its executable."""
    executable = PYSPY_VENV / "bin" / "py-spy"
    marker = PYSPY_VENV / f".installed-py-spy-{PYSPY_VERSION}"
    if not marker.exists():
        print(f"==> installing py-spy {PYSPY_VERSION} into {PYSPY_VENV} (once)", file=sys.stderr)
        venv.create(PYSPY_VENV, with_pip=True)
        subprocess.run(
            [str(PYSPY_VENV / "bin" / "pip"), "install", "--quiet", f"py-spy=={PYSPY_VERSION}"],
            check=True,
        )
        marker.touch()
    return executable


def top(collapsed: Path, limit: int) -> tuple[int, list[tuple[str, int, int]]]:
    """Samples in all, and the functions with the most inclusive samples: (name, incl, self)."""
    inclusive: collections.Counter[str] = collections.Counter()
    own: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        total += count
        frames = stack.split(";")
        for frame in set(frames):
            inclusive[frame] += count
        own[frames[-1]] += count
    ranked = sorted(inclusive, key=lambda f: (-own[f], -inclusive[f]))[:limit]
    return total, [(f, inclusive[f], own[f]) for f in ranked]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default="unary-exact-miss", choices=sorted(SCENARIOS))
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=WORK / "profile")
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0)
    parser.add_argument("--first-delay-ms", type=float, default=0.0)
    parser.add_argument(
        "--idle", action="store_true", help="include py-spy's idle samples (waiting threads)"
    )
    parser.add_argument(
        "--native", action="store_true", help="sample C frames too (grpc core, protobuf, ...)"
    )
    parser.add_argument(
        "--perf",
        action="store_true",
        help="sample CPU time with Linux perf instead: CPU by shared object and symbol",
    )
    return parser.parse_args(argv)


def perf_report(samples: Path, sort: str, limit: int) -> list[str]:
    """The top lines of `perf report` of `samples`, sorted by `sort` (dso, or dso,sym)."""
    report = subprocess.run(
        ["perf", "report", "-i", str(samples), "--stdio", "--quiet", "--sort", sort],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in report.stdout.splitlines() if line.strip()][:limit]


async def load(address: str, key: str, args: argparse.Namespace) -> int:
    scenario = SCENARIOS[args.scenario]
    prompts = Prompts(seed=int(time.time()))
    async with grpc.aio.insecure_channel(address) as channel:
        call = grpc_call(orchestrator_pb2_grpc.OrchestratorServiceStub(channel), key)
        questions = [prompts.unique(n) for n in range(200_000)]
        if scenario.prompts == "exact":
            questions = [prompts.exact(0)] * len(questions)
        # Warm-up (connections, caches, first-call imports) outside the profile.
        await drive(call, questions[:50], scenario, args.concurrency, 30)
        outcomes, wall = await drive(call, questions[50:], scenario, args.concurrency, args.seconds)
    failed = sum(1 for o in outcomes if not o.ok)
    print(
        f"==> {len(outcomes)} requests in {wall:.1f} s ({len(outcomes) / wall:.0f}/s), "
        f"{failed} failed",
        file=sys.stderr,
    )
    return len(outcomes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.perf and shutil.which("perf") is None:
        print("--perf needs Linux perf (Debian: apt install linux-perf)", file=sys.stderr)
        return 2
    pyspy = None if args.perf else ensure_pyspy()
    args.out.mkdir(parents=True, exist_ok=True)
    run_dir = args.out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    with strata_on_upstream(run_dir, args, f"profile-{int(time.time())}") as (local, key):
        recorders: dict[str, subprocess.Popen[bytes]] = {}
        parts = [p for p in STRATA_PARTS if p in local.services]

        def record() -> None:
            for part in parts:
                process = local.services[part].process
                assert process is not None
                if pyspy is None:
                    samples = args.out / f"{part}.perf"
                    command = [
                        "perf", "record", "--quiet", "-F", str(args.rate),
                        "-p", str(process.pid), "-o", str(samples),
                        "--", "sleep", str(int(args.seconds)),
                    ]  # fmt: skip
                    recorders[part] = subprocess.Popen(
                        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                    )
                    continue
                command = [
                    str(pyspy), "record", "--pid", str(process.pid), "--rate", str(args.rate),
                    "--duration", str(int(args.seconds)), "--format", "raw",
                    "--output", str(args.out / f"{part}.txt"),
                ]  # fmt: skip
                (args.out / f"{part}.txt").unlink(missing_ok=True)
                if args.idle:
                    command.append("--idle")
                # Native frames need the process paused while sampled (slower, exact);
                # else py-spy reads it running.
                command.append("--native" if args.native else "--nonblocking")
                recorders[part] = subprocess.Popen(
                    command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
                )

        async def run() -> int:
            # Recording starts once the warm-up is done: a short pause lets it begin first.
            loop = asyncio.get_running_loop()
            loop.call_later(2.0, record)
            return await load(local.addresses["orchestrator"], key, args)

        print(
            f"==> {args.scenario} at c={args.concurrency} for {args.seconds:.0f} s", file=sys.stderr
        )
        asyncio.run(run())
        for part, recorder in recorders.items():
            _, err = recorder.communicate(timeout=args.seconds + 60)
            if recorder.returncode != 0:
                print(
                    f"    {'perf' if args.perf else 'py-spy'} on {part} failed: "
                    f"{err.decode(errors='replace')}",
                    file=sys.stderr,
                )
    if args.perf:
        for part in parts:
            samples = args.out / f"{part}.perf"
            if samples.exists():
                print(f"\n## {part}: CPU by shared object, then by symbol ({samples})")
                print("\n".join(perf_report(samples, "dso", 12)))
                print("\n".join(perf_report(samples, "dso,sym", args.top)))
        return 0
    for part in parts:
        collapsed = args.out / f"{part}.txt"
        if not collapsed.exists():
            continue
        total, ranked = top(collapsed, args.top)
        print(f"\n## {part}: {total} samples ({collapsed})")
        print(f"{'incl %':>7} {'self %':>7}  function")
        for name, inclusive, own in ranked:
            print(f"{100 * inclusive / total:7.1f} {100 * own / total:7.1f}  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
