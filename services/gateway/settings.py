"""Settings of the HTTP door (environment variables STRATA_GATEWAY_*)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.common.settings import ServiceSettings


class GatewaySettings(ServiceSettings):
    """Where to listen and which orchestrator to call."""

    model_config = SettingsConfigDict(env_prefix="STRATA_GATEWAY_")

    port: int = 8080
    """HTTP port to listen on; 0 picks a free one (tests)."""
    orchestrator_address: str
    """host:port of the orchestrator's gRPC API (dns:///name:port for round-robin)."""
    default_deadline_s: float = 600.0
    """Deadline of a call whose client gave none (the orchestrator may apply a shorter one)."""
    models_ttl_s: float = 30.0
    """How long the list of models and routes is reused before it is asked for again."""
    keep_alive_s: int = Field(default=75, ge=1)
    """How long an idle client connection is kept open. Longer than the idle timeouts of
    common load balancers and proxies (60 s), so they, not the door, close idle connections:
    a request sent on a connection that the door is closing at that moment fails (a 502 at
    the balancer, a dropped connection at a client). Clients that keep connections
    themselves should drop them sooner than this."""
