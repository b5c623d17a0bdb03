"""A service process runs gRPC core's POSIX transport (iomgr) for its channels and its
listener, unless GRPC_EXPERIMENTS says otherwise (services/__init__.py).

gRPC core names the source file of each trace line; with `GRPC_TRACE=tcp` a process that
listens and connects to itself once shows which transport carried the connection:
`tcp_server_posix.cc` and `tcp_client_posix.cc` for iomgr, the EventEngine's `endpoint.cc`
(and `posix_endpoint.cc`) otherwise. The probe runs in a fresh interpreter because the
variable only counts before grpc loads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# What a service's `python -m services.<name>` does first: import the package, then grpc.
PROBE = """
import services
import asyncio
import grpc

async def main():
    server = grpc.aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    await asyncio.wait_for(channel.channel_ready(), 10)
    await channel.close()
    await server.stop(None)

asyncio.run(main())
"""

IOMGR = ("tcp_server_posix.cc", "tcp_client_posix.cc")
EVENT_ENGINE = "endpoint.cc:"


def _trace(**env: str) -> str:
    """gRPC core's tcp trace of a fresh process that listens and connects to itself."""
    base = {k: v for k, v in os.environ.items() if k not in ("GRPC_EXPERIMENTS", "GRPC_TRACE")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        env=base | {"GRPC_TRACE": "tcp", "GRPC_VERBOSITY": "debug"} | env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stderr


def test_a_service_process_serves_and_calls_over_the_posix_transport() -> None:
    trace = _trace()
    for source in IOMGR:
        assert source in trace
    assert EVENT_ENGINE not in trace


@pytest.mark.parametrize("value", ["", "-event_engine_dns"])
def test_grpc_experiments_set_by_the_operator_win(value: str) -> None:
    # Empty gives grpc's own defaults (the EventEngine); any other value is passed on as
    # it is, without ours added.
    trace = _trace(GRPC_EXPERIMENTS=value)
    assert EVENT_ENGINE in trace
    for source in IOMGR:
        assert source not in trace
