"""The four services as local processes, with a Redis: used by `strata dev` and the stack tests.

Each service runs as `python -m services.<name>`, logs to `<run_dir>/logs/<name>.log` and
writes its bound port to a file, so tests can use port 0 and no port is ever guessed.
Readiness is the gRPC health check, never a sleep.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ("control", "cache", "executor", "orchestrator")
DEFAULT_PORTS = {"orchestrator": 50051, "control": 50052, "cache": 50053, "executor": 50054}


class StackError(RuntimeError):
    """A process did not start or did not become healthy; the message points at its log."""


def redis_answers(url: str, timeout_s: float = 0.5) -> bool:
    """True when a Redis server answers PING at `url`."""
    try:
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def free_port() -> int:
    """A TCP port that was free a moment ago (only for servers that cannot bind port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class PrivateRedis:
    """A `redis-server` of our own, without persistence, for when none answers."""

    directory: Path
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("no Redis answers and redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(self.directory / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not redis_answers(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StackError(f"redis-server did not start; see {self.directory / 'redis.log'}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def wait_serving(
    address: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None
) -> None:
    """Blocks until the gRPC health check at `address` answers SERVING."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process is not None and process.poll() is not None:
                raise StackError(f"process serving {address} exited with {process.returncode}")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise StackError(f"{address} was not SERVING after {timeout_s:.0f}s")
            time.sleep(0.05)


@dataclass
class LocalStack:
    """The four services as subprocesses of this one."""

    run_dir: Path
    models_file: Path
    tenants_file: Path
    redis_url: str
    ports: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(SERVICES, 0))
    env: Mapping[str, str] = field(default_factory=dict)
    """Extra environment for every service (settings overrides)."""
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)

    def log_path(self, service: str) -> Path:
        return self.run_dir / "logs" / f"{service}.log"

    def _spawn(self, service: str, settings: Mapping[str, str]) -> None:
        prefix = f"STRATA_{service.upper()}_"
        port_file = self.run_dir / f"{service}.port"
        port_file.unlink(missing_ok=True)
        env = {
            **os.environ,
            **self.env,
            **{prefix + k: v for k, v in settings.items()},
            prefix + "PORT": str(self.ports.get(service, 0)),
            prefix + "PORT_FILE": str(port_file),
            "PYTHONUNBUFFERED": "1",
        }
        log = self.log_path(service).open("ab")
        self.processes[service] = subprocess.Popen(
            [sys.executable, "-m", f"services.{service}"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def _await_port(self, service: str, timeout_s: float) -> str:
        port_file = self.run_dir / f"{service}.port"
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            process = self.processes[service]
            if process.poll() is not None:
                raise StackError(
                    f"{service} exited with {process.returncode}; see {self.log_path(service)}"
                )
            if time.monotonic() > deadline:
                raise StackError(f"{service} did not bind a port; see {self.log_path(service)}")
            time.sleep(0.02)
        address = f"127.0.0.1:{int(port_file.read_text())}"
        self.addresses[service] = address
        return address

    def start(self, timeout_s: float = 60.0) -> LocalStack:
        """Starts control, cache and executor, then the orchestrator pointed at them."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self._spawn(
                "control", {"REDIS_URL": self.redis_url, "TENANTS_FILE": str(self.tenants_file)}
            )
            self._spawn("cache", {"REDIS_URL": self.redis_url})
            self._spawn("executor", {"MODELS_FILE": str(self.models_file)})
            for service in ("control", "cache", "executor"):
                self._await_port(service, timeout_s)
            self._spawn(
                "orchestrator",
                {
                    "CONTROL_ADDRESS": self.addresses["control"],
                    "CACHE_ADDRESS": self.addresses["cache"],
                    "EXECUTOR_ADDRESS": self.addresses["executor"],
                    "MODELS_FILE": str(self.models_file),
                },
            )
            self._await_port("orchestrator", timeout_s)
            for service in SERVICES:
                wait_serving(self.addresses[service], timeout_s, self.processes[service])
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every service (they drain), SIGKILL to any still running after `grace_s`."""
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes.values():
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()
