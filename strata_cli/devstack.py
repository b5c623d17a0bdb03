"""The four services as local processes, with a Redis: used by `strata dev` and the stack tests.

Each service runs as `python -m services.<name>`, logs to `<run_dir>/logs/<name>.log` and
writes its bound port to a file, so tests can use port 0 and no port is ever guessed.
Readiness is the gRPC health check, never a sleep.
"""

from __future__ import annotations

import os
import secrets
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
import httpx
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVICES = ("control", "cache", "executor", "orchestrator")
DEFAULT_PORTS = {
    "orchestrator": 50051,
    "control": 50052,
    "cache": 50053,
    "executor": 50054,
    "gateway": 8080,
}


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
    """A `redis-server` of our own, for when none answers: without persistence, or, when
    `durable`, with every write on disk (a restart on the same port keeps the data)."""

    directory: Path
    port: int = 0
    """0: a free port, picked at the first start (a restart keeps it)."""
    process: subprocess.Popen[bytes] | None = None
    durable: bool = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise StackError("no Redis answers and redis-server is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        persistence = ["yes", "--appendfsync", "always"] if self.durable else ["no"]
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
                *persistence,
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


def wait_http_ok(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None) -> None:
    """Blocks until `url` answers 200 (the HTTP door's health)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if process is not None and process.poll() is not None:
            raise StackError(f"{url}: the process exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise StackError(f"{url} did not answer 200 within {timeout_s:.0f}s")
        time.sleep(0.05)


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
class ServiceProcess:
    """One service as a subprocess: `python -m services.<service>`, its log, its port."""

    service: str
    run_dir: Path
    settings: Mapping[str, str]
    """Settings without the service's prefix (e.g. {"REDIS_URL": ...})."""
    port: int = 0
    name: str = ""
    """Names the log and port files (default: the service); replicas need distinct names."""
    env: Mapping[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    address: str = ""

    @property
    def label(self) -> str:
        return self.name or self.service

    @property
    def log_path(self) -> Path:
        return self.run_dir / "logs" / f"{self.label}.log"

    def spawn(self) -> ServiceProcess:
        """Starts the process (returns at once; see `wait_bound`)."""
        prefix = f"STRATA_{self.service.upper()}_"
        port_file = self.run_dir / f"{self.label}.port"
        port_file.unlink(missing_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self.env,
            **{prefix + k: v for k, v in self.settings.items()},
            prefix + "PORT": str(self.port),
            prefix + "PORT_FILE": str(port_file),
            "PYTHONUNBUFFERED": "1",
        }
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", f"services.{self.service}"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self

    def wait_bound(self, timeout_s: float) -> str:
        """Waits for the port file; returns host:port."""
        assert self.process is not None
        port_file = self.run_dir / f"{self.label}.port"
        deadline = time.monotonic() + timeout_s
        while not port_file.exists():
            if self.process.poll() is not None:
                raise StackError(
                    f"{self.label} exited with {self.process.returncode}; see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise StackError(f"{self.label} did not bind a port; see {self.log_path}")
            time.sleep(0.02)
        self.address = f"127.0.0.1:{int(port_file.read_text())}"
        return self.address

    def start(self, timeout_s: float = 60.0) -> ServiceProcess:
        """Spawns the process and waits until it is SERVING."""
        self.spawn()
        try:
            wait_serving(self.wait_bound(timeout_s), timeout_s, self.process)
        except BaseException:
            self.stop()
            raise
        return self

    def terminate(self) -> None:
        """Sends SIGTERM (the service drains)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it is still running after `grace_s`."""
        self.terminate()
        if self.process is not None:
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


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
    gateway: bool = False
    """Also run the OpenAI-compatible HTTP door (`services.gateway`) before the orchestrator."""
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def addresses(self) -> dict[str, str]:
        return {name: service.address for name, service in self.services.items()}

    def _spawn(self, service: str, settings: Mapping[str, str]) -> ServiceProcess:
        process = ServiceProcess(
            service, self.run_dir, settings, port=self.ports.get(service, 0), env=self.env
        )
        self.services[service] = process.spawn()
        return process

    def start(self, timeout_s: float = 60.0) -> LocalStack:
        """Starts control, cache and executor, then the orchestrator pointed at them."""
        try:
            self._spawn(
                "control",
                {
                    "REDIS_URL": self.redis_url,
                    "TENANTS_FILE": str(self.tenants_file),
                    "MODELS_FILE": str(self.models_file),
                },
            )
            # The orchestrator drops cached answers of updated documents through the cache's
            # admin API: the two share a token made for this stack.
            cache_admin_token = secrets.token_urlsafe(24)
            self._spawn(
                "cache",
                {
                    "REDIS_URL": self.redis_url,
                    "DATA_DIR": str(self.run_dir / "cache"),
                    "ADMIN_TOKEN": cache_admin_token,
                },
            )
            self._spawn("executor", {"MODELS_FILE": str(self.models_file)})
            for name in ("control", "cache", "executor"):
                self.services[name].wait_bound(timeout_s)
            orchestrator = self._spawn(
                "orchestrator",
                {
                    "CONTROL_ADDRESS": self.services["control"].address,
                    "CACHE_ADDRESS": self.services["cache"].address,
                    "EXECUTOR_ADDRESS": self.services["executor"].address,
                    "MODELS_FILE": str(self.models_file),
                    "REDIS_URL": self.redis_url,
                    "DATA_DIR": str(self.run_dir / "orchestrator"),
                    "CACHE_ADMIN_TOKEN": cache_admin_token,
                },
            )
            orchestrator.wait_bound(timeout_s)
            if self.gateway:
                door = self._spawn("gateway", {"ORCHESTRATOR_ADDRESS": orchestrator.address})
                door.wait_bound(timeout_s)
            for name, process in self.services.items():
                if name == "gateway":
                    wait_http_ok(f"http://{process.address}/healthz", timeout_s, process.process)
                else:
                    wait_serving(process.address, timeout_s, process.process)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every service (they drain), SIGKILL to any still running after `grace_s`."""
        for service in self.services.values():
            service.terminate()
        deadline = time.monotonic() + grace_s
        for service in self.services.values():
            service.stop(max(0.0, deadline - time.monotonic()))
        self.services.clear()
