"""Settings shared by every service; each service subclasses `ServiceSettings` with its prefix."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    """What every service process needs: where to listen and how to stop."""

    model_config = SettingsConfigDict(extra="ignore", validate_by_name=True)

    host: str = "127.0.0.1"
    """Interface to listen on; 0.0.0.0 in containers."""
    port: int = 0
    """Port to listen on; 0 picks a free one (tests)."""
    port_file: Path | None = None
    """When set, the bound port is written here once the server listens (for launchers)."""
    log_level: str = "INFO"
    """Python logging level."""
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    """The event loop the process runs on: uvloop (libuv; a little less CPU per call, see
    services/common/loops.py) or the standard library's."""
    shutdown_grace_s: float = 10.0
    """On SIGTERM, how long open calls may run before they are cancelled."""
    health_probe_interval_s: float = 5.0
    """How often the dependencies are probed to keep the health status true."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest gRPC message accepted or sent."""
    otlp_endpoint: str | None = None
    """OTLP/gRPC collector for traces and metrics (e.g. http://otel-collector:4317); unset:
    spans are made (and trace context carried on) but not exported."""
    otlp_timeout_s: float = 2.0
    """Longest an export may take; a slow collector drops data, never delays requests."""
    span_queue_size: int = Field(default=2048, ge=1)
    """Spans waiting for export; beyond it they are dropped (and counted)."""
    metrics_port: int | None = None
    """Port of the Prometheus scrape endpoint (/metrics); unset: none; 0: any free port."""
    metric_export_interval_s: float = 15.0
    """How often metrics are pushed to the OTLP collector."""
    capture_content: bool = False
    """Record prompts and answers (after PII redaction) as span events and in request
    records. Off by default: traces often leave the company."""
    content_max_bytes: int = 4096
    """Captured content is cut past this many bytes (and flagged as cut)."""
    max_inflight: int | None = Field(default=None, ge=1)
    """Calls this process runs at once (a stream counts until it ends); past it a call is
    refused at once with RESOURCE_EXHAUSTED/OVERLOADED and a retry delay. Unset: 256 for
    the orchestrator, 1024 for control, cache and executor (they serve every orchestrator)."""
    batch_share: float = Field(default=0.8, gt=0, le=1)
    """Share of `max_inflight` that batch-priority calls may fill, so that batch is refused
    before interactive calls are."""
    overload_retry_after_s: float = Field(default=1.0, gt=0)
    """Retry delay sent with an OVERLOADED refusal."""
    internal_token: SecretStr | None = None
    """Shared secret of Strata's own services: control, cache and executor refuse calls
    whose `x-strata-internal` metadata is not this token (health, reflection and the admin
    APIs, which have their own token, stay open); the orchestrator, gateway and cache send
    it on every call. Unset: no token is asked for or sent."""
    tls_cert_file: Path | None = None
    """PEM certificate this process presents, as a server and as a client (mutual TLS).
    Set together with `tls_key_file` and `tls_ca_file`; unset: plaintext."""
    tls_key_file: Path | None = None
    """PEM private key of `tls_cert_file`."""
    tls_ca_file: Path | None = None
    """PEM CA bundle that peers' certificates must chain to: internal services require a
    client certificate signed by it, clients verify servers against it."""
    health_port: int | None = None
    """A second port, always plaintext, that serves only the standard health service (Check
    and Watch): for probes that cannot present a client certificate, such as Kubernetes
    `grpc:` probes, when mutual TLS is on. Unset: none; 0: any free port."""
    public_tls: bool = False
    """Whether the orchestrator's public port uses TLS too: the orchestrator serves it with
    the certificate above (asking clients for none), the gateway connects with it. Off: the
    public port stays plaintext, for TLS at the ingress; the internal services still require
    mutual TLS when the certificates are set."""


class ConfigError(Exception):
    """A configuration file or value is missing or invalid; the message says which."""


_S = TypeVar("_S", bound=BaseSettings)


def load_settings(cls: type[_S]) -> _S:
    """Loads settings from the environment; exits naming each missing or invalid variable."""
    try:
        return cls()
    except ValidationError as err:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = []
        for problem in err.errors():
            name = ".".join(str(part) for part in problem["loc"])
            env = name if name.isupper() else f"{prefix}{name}".upper()
            lines.append(f"  {env}: {problem['msg']}")
        sys.exit(f"{cls.__name__}: invalid configuration\n" + "\n".join(lines))
