"""Trust between Strata's services: mutual TLS and a shared internal token.

Control, cache and executor serve only Strata's own services. Two mechanisms, each
optional, both configured by the shared settings (`ServiceSettings`):

- Mutual TLS (`tls_cert_file`, `tls_key_file`, `tls_ca_file`): every server presents its
  certificate; the internal services also require a client certificate that chains to the
  CA, and every client verifies the server against the CA. The orchestrator's public port
  never asks clients for a certificate, and serves TLS only when `public_tls` is on.
- An internal token (`internal_token`): every Strata client adds `x-strata-internal:
  <token>` to its calls; the internal services refuse a call without it with
  UNAUTHENTICATED/INTERNAL_TOKEN_INVALID, compared in constant time. Health and reflection
  stay open (probes and tools carry no token), and so do the admin APIs, which are guarded
  by their own bearer token.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from services.common.errors import InternalTokenInvalid
from services.common.settings import ConfigError, ServiceSettings

INTERNAL_TOKEN_KEY = "x-strata-internal"
INTERNAL_SERVICES = frozenset({"control", "cache", "executor"})
"""Services that serve Strata only; the orchestrator's API is public."""
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/strata.control.v1.ControlAdminService/",
    "/strata.cache.v1.CacheAdminService/",
)
"""Methods that an internal service answers without the internal token."""


@dataclass(frozen=True)
class Trust:
    """What a process proves and checks on its gRPC connections."""

    token: str | None = None
    """The internal token sent (client) or required (internal server)."""
    certificate: bytes | None = None
    """PEM certificate chain presented."""
    private_key: bytes | None = None
    """PEM key of the certificate."""
    ca: bytes | None = None
    """PEM CA that peers must chain to."""
    tls: bool = False
    """Whether connections use TLS."""

    @classmethod
    def of(cls, settings: ServiceSettings, *, public: bool = False) -> Trust:
        """The trust configured in `settings`. `public`: for a connection to (or the port
        of) the orchestrator's public API, which uses TLS only when `public_tls` is on."""
        files = (settings.tls_cert_file, settings.tls_key_file, settings.tls_ca_file)
        token = settings.internal_token.get_secret_value() if settings.internal_token else None
        if not any(files):
            return cls(token=token or None)
        if not all(files):
            raise ConfigError("mutual TLS needs all of tls_cert_file, tls_key_file and tls_ca_file")
        try:
            certificate, private_key, ca = (path.read_bytes() for path in files if path)
        except OSError as err:
            raise ConfigError(f"cannot read a TLS file: {err}") from err
        return cls(
            token=token or None,
            certificate=certificate,
            private_key=private_key,
            ca=ca,
            tls=settings.public_tls if public else True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials of a client channel (None: plaintext)."""
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.private_key,
            certificate_chain=self.certificate,
        )

    def server_credentials(self, *, require_client_auth: bool) -> grpc.ServerCredentials | None:
        """Credentials of a server port (None: plaintext)."""
        if not self.tls or self.certificate is None or self.private_key is None:
            return None
        return grpc.ssl_server_credentials(
            [(self.private_key, self.certificate)],
            root_certificates=self.ca,
            require_client_auth=require_client_auth,
        )


def server_trust(settings: ServiceSettings, service: str) -> tuple[Trust, bool]:
    """The trust of a service's port, and whether it is internal (mutual TLS, token)."""
    internal = service in INTERNAL_SERVICES
    return Trust.of(settings, public=not internal), internal


# --- server side ---------------------------------------------------------------------------


class InternalTokenCheck(grpc.aio.ServerInterceptor):
    """Refuses calls without the internal token, before their request is even parsed."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self._refusal = InternalTokenInvalid(
            f"internal services accept only Strata's own calls (metadata {INTERNAL_TOKEN_KEY})"
        ).to_status()

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        if self._presented_ok(details.invocation_metadata):
            return handler
        return self._refusing(handler)

    def _presented_ok(self, metadata: Sequence[tuple[str, Any]] | None) -> bool:
        presented = b""
        for key, value in metadata or ():
            if key == INTERNAL_TOKEN_KEY:
                presented = value.encode() if isinstance(value, str) else bytes(value)
                break
        return hmac.compare_digest(presented, self._token)

    def _refusing(self, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        refusal = self._refusal

        async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            await context.abort_with_status(refusal)

        async def refuse_stream(request: Any, context: Any) -> Any:
            await context.abort_with_status(refusal)
            yield  # pragma: no cover - abort raises

        # The request stays bytes: no parsing for a caller that is refused anyway.
        serialize = handler.response_serializer
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(refuse, response_serializer=serialize)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                refuse_stream, response_serializer=serialize
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=serialize)
        return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=serialize)
