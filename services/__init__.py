"""Strata's services: each subpackage runs as its own process (`python -m services.<name>`).

Importing this package, which every service process does before it imports grpc, sets
the gRPC core's transport for the process: unless `GRPC_EXPERIMENTS` is already set, the
client and listener sockets go through the core's own POSIX I/O (iomgr) instead of the
EventEngine that grpcio turned on for Python in 1.80. For grpc.aio on this workload the
older path is the cheaper one (bench/grpc_hop.py, grpcio 1.85.3, 2 cores, alternating
runs: a unary call costs the client about 130 µs of CPU instead of 165-220, the server
about 170 instead of 180-195, and the round trip is about 355 µs instead of 420-440).
The variable is read once, when grpc loads, so it has to be set before that: a process
that imported grpc first keeps grpc's default. `GRPC_EXPERIMENTS=` (empty) gives a
service grpc's defaults; any other value is passed on as it is.
"""

from __future__ import annotations

import os

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
