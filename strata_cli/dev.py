"""`strata dev` (`make run`): the whole suite on this machine, on the embedded defaults.

Uses the Redis at $REDIS_URL, else the one on 127.0.0.1:6379, else starts a private
redis-server. Creates a demo tenant with a fresh key on first run (only its hash is in
the tenants file), starts the four services, streams one answer, and keeps running until
Ctrl-C.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import sys
import threading
from pathlib import Path

import grpc

from services.control.keys import new_key
from strata_cli.__main__ import stream_chat
from strata_cli.devstack import DEFAULT_PORTS, LocalStack, PrivateRedis, StackError, redis_answers
from strata_cli.errors import describe_error

LOCAL_REDIS = "redis://127.0.0.1:6379/0"


def demo_tenant(run_dir: Path) -> tuple[Path, str]:
    """The tenants file and the demo key, made once per run directory."""
    tenants, key_file = run_dir / "tenants.yaml", run_dir / "demo.key"
    if not (tenants.exists() and key_file.exists()):
        key, digest = new_key()
        tenants.write_text(
            "# Written by `strata dev`: a demo tenant for the local stack.\n"
            "tenants:\n  demo:\n    name: Local demo\n    keys:\n"
            f"      - id: demo-key\n        sha256: {digest}\n"
            "        requests_per_minute: 600\n        tokens_per_minute: 1000000\n"
        )
        key_file.write_text(key + "\n")
        key_file.chmod(0o600)
    return tenants, key_file.read_text().strip()


def run_dev(run_dir: Path, models_file: Path, prompt: str) -> int:
    """Runs the local stack until interrupted; returns the exit code."""
    run_dir.mkdir(parents=True, exist_ok=True)
    tenants, key = demo_tenant(run_dir)
    private: PrivateRedis | None = None
    redis_url = os.environ.get("REDIS_URL", LOCAL_REDIS)
    if redis_answers(redis_url):
        print(f"==> using Redis at {redis_url}")
    else:
        print(f"==> no Redis at {redis_url}; starting a private redis-server")
        private = PrivateRedis(run_dir / "redis").start()
        redis_url = private.url
    ports = {
        name: int(os.environ.get(f"STRATA_{name.upper()}_PORT", port))
        for name, port in DEFAULT_PORTS.items()
    }
    token_file = run_dir / "admin.token"
    if not token_file.exists():
        token_file.write_text(secrets.token_hex(24) + "\n")
        token_file.chmod(0o600)
    config = models_file.resolve().parent
    admin_env = {
        "STRATA_CONTROL_ADMIN_TOKEN": token_file.read_text().strip(),
        # The example routes and pipelines beside the models file, unless set already.
        **{
            f"STRATA_ORCHESTRATOR_{name}": str(config / file)
            for name, file in (("ROUTES_FILE", "routes.yaml"), ("PIPELINES_FILE", "pipelines.yaml"))
            if (config / file).exists() and f"STRATA_ORCHESTRATOR_{name}" not in os.environ
        },
    }
    stack = LocalStack(
        run_dir,
        models_file.resolve(),
        tenants.resolve(),
        redis_url,
        ports,
        env=admin_env,
        gateway=True,
    )
    print("==> starting control, cache, executor, orchestrator, gateway (logs in .run/logs/)")
    try:
        stack.start()
        print()
        print("  service       address            calls")
        print(f"  orchestrator  {stack.addresses['orchestrator']:<18} control, cache, executor")
        print(f"  control       {stack.addresses['control']:<18} redis")
        print(f"  cache         {stack.addresses['cache']:<18} redis")
        print(f"  executor      {stack.addresses['executor']:<18} providers (mock)")
        print(f"  gateway       {stack.addresses['gateway']:<18} orchestrator (OpenAI API)")
        print(f"\n==> streaming an answer: strata chat {prompt!r}\n")
        try:
            stream_chat(stack.addresses["orchestrator"], key, "mock-small", prompt)
        except grpc.RpcError as err:
            print(f"\nerror: {describe_error(err)}", file=sys.stderr)
            return 1
        print(
            "\n==> Strata is running. In another terminal:\n"
            f"  export STRATA_API_KEY=$(cat {run_dir}/demo.key)\n"
            '  .venv/bin/strata chat "Hello, Strata"\n'
            f"  export STRATA_ADMIN_TOKEN=$(cat {run_dir}/admin.token)\n"
            "  .venv/bin/strata admin usage --tenant demo --period day\n"
            '  grpcurl -plaintext -H "authorization: Bearer $STRATA_API_KEY" -d '
            '\'{"model":"mock-small","messages":[{"role":"ROLE_USER","content":"hi"}]}\' '
            f"{stack.addresses['orchestrator']} "
            "strata.orchestrator.v1.OrchestratorService/StreamGenerate\n"
            f"  curl http://{stack.addresses['gateway']}/v1/chat/completions "
            '-H "authorization: Bearer $STRATA_API_KEY" -H "content-type: application/json" '
            '-d \'{"model":"mock-small","messages":[{"role":"user","content":"hi"}]}\'\n'
            "Press Ctrl-C to stop."
        )
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
        print("\n==> stopping")
    except StackError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        stack.stop()
        if private is not None:
            private.stop()
    return 0
