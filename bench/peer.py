"""The peer the overhead benchmark compares with: the LiteLLM proxy, in a virtualenv of its own.

    .venv/bin/python -m bench.peer [--workers 1] [--upstream http://127.0.0.1:PORT/v1]

LiteLLM is never a project dependency: the first run creates `bench/.work/litellm-venv`
(ignored by git) with `litellm[proxy]` at the pinned version and reuses it after that. The
proxy runs with a config written for the run: the benchmark's models, each sent to the same
local upstream (`openai/` provider with `api_base`), no database, no master key, no
retries, no cache, its model-cost map read from the package (no network at start-up).

When the install fails (a dependency that cannot be fetched, a wheel that does not build)
`PeerUnavailable` carries the reason and the benchmark runs without the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import venv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from strata_cli.devstack import free_port, wait_http_ok

LITELLM_VERSION = "1.80.17"
"""The newest 1.80.x release on PyPI when the benchmark was written."""
WORK = Path(__file__).resolve().parent / ".work"
VENV = WORK / "litellm-venv"
INSTALL_TIMEOUT_S = 1200.0


class PeerUnavailable(RuntimeError):
    """The peer could not be installed or did not start; the message says why."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_installed(venv_dir: Path = VENV, version: str = LITELLM_VERSION) -> Path:
    """The `litellm` executable of a virtualenv holding `litellm[proxy]==version`.

    Installs it when missing (minutes, once); raises PeerUnavailable when it cannot.
    """
    executable = venv_dir / "bin" / "litellm"
    marker = venv_dir / f".installed-{version}"
    if marker.exists() and executable.exists():
        return executable
    venv_dir.parent.mkdir(parents=True, exist_ok=True)
    log_path = venv_dir.parent / "litellm-install.log"
    print(
        f"==> installing litellm[proxy]=={version} into {venv_dir} (once; log {log_path})",
        file=sys.stderr,
    )
    try:
        if not (venv_dir / "bin" / "python").exists():
            venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
        pip = [str(venv_dir / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
        with log_path.open("w") as log:
            for command in (
                [*pip, "install", "--upgrade", "pip"],
                [*pip, "install", f"litellm[proxy]=={version}"],
            ):
                done = subprocess.run(
                    command,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=INSTALL_TIMEOUT_S,
                    check=False,
                )
                if done.returncode != 0:
                    raise PeerUnavailable(
                        f"`{' '.join(command[3:])}` failed with {done.returncode}:\n"
                        + _tail(log_path)
                    )
    except subprocess.TimeoutExpired as err:
        raise PeerUnavailable(f"installing litellm took over {err.timeout:.0f}s") from err
    except OSError as err:
        raise PeerUnavailable(f"could not create {venv_dir}: {err}") from err
    if not executable.exists():
        raise PeerUnavailable(f"the install left no {executable}")
    marker.write_text(f"litellm[proxy]=={version}\n")
    return executable


def proxy_config(upstream_base_url: str, models: Sequence[str]) -> dict[str, object]:
    """A LiteLLM proxy config: each model sent as is to the upstream, nothing else on."""
    return {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{name}",
                    "api_base": upstream_base_url,
                    "api_key": "sk-bench-upstream",
                },
            }
            for name in models
        ],
        "litellm_settings": {
            "drop_params": True,
            "num_retries": 0,
            "request_timeout": 120,
            "telemetry": False,
        },
        "general_settings": {"disable_spend_logs": True},
    }


@dataclass
class LiteLLMProxy:
    """One `litellm` proxy process (and its workers) on a free port."""

    executable: Path
    run_dir: Path
    upstream_base_url: str
    models: Sequence[str]
    workers: int = 1
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"litellm-{self.workers}w"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "logs" / f"{self.label}.log"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout_s: float = 180.0) -> LiteLLMProxy:
        """Starts the proxy and waits until it answers its liveness check."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        config = self.run_dir / f"{self.label}.yaml"
        config.write_text(yaml.safe_dump(proxy_config(self.upstream_base_url, self.models)))
        # Several workers share one listening socket, so the port cannot be 0.
        self.port = free_port()
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("OPENAI_", "LITELLM_", "DATABASE_URL", "VIRTUAL_ENV"))
        }
        env.update(
            {
                "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                "LITELLM_LOG": "ERROR",
                "LITELLM_MODE": "PRODUCTION",
                "PYTHONUNBUFFERED": "1",
                "PATH": f"{self.executable.parent}:{env.get('PATH', '')}",
                **self.env,
            }
        )
        command = [
            str(self.executable),
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--num_workers",
            str(self.workers),
        ]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.run_dir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_http_ok(f"{self.base_url}/health/liveliness", timeout_s, self.process)
        except Exception as err:
            self.stop()
            raise PeerUnavailable(
                f"{self.label} did not start: {err}\n{_tail(self.log_path)}"
            ) from err
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to the proxy's process group (its workers too), SIGKILL after `grace_s`."""
        if self.process is None or self.process.poll() is not None:
            return
        group = self.process.pid  # start_new_session: the group is the proxy's own
        os.killpg(group, signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(group, signal.SIGKILL)
            self.process.wait()
        # Workers that outlived their parent.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--upstream", help="base URL of an upstream, e.g. http://host:port/v1")
    parser.add_argument("--model", default="bench")
    args = parser.parse_args()
    try:
        executable = ensure_installed()
    except PeerUnavailable as err:
        print(f"peer unavailable: {err}", file=sys.stderr)
        return 1
    print(f"installed: {executable}")
    if args.upstream:
        proxy = LiteLLMProxy(
            executable, WORK / "peer-run", args.upstream, [args.model], args.workers
        )
        proxy.start()
        print(f"{proxy.label} serving on {proxy.base_url} (Ctrl-C stops it)")
        try:
            while proxy.process is not None and proxy.process.poll() is None:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
