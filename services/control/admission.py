"""Admission and settlement: per-key limits and usage, each decision one Redis script.

Every key a request touches carries its tenant's hash tag (`{t:<tenant>}`), so the scripts
run on one Redis Cluster slot. Limits are GCRA over a one-minute window on Redis server
time: a key may use a whole minute's allowance at once, then at the steady rate.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import redis.asyncio as redis

from services.common.errors import FieldViolation, RateLimited, RequestInvalid, StrataError
from services.common.redis_state import redis_errors
from services.common.validation import check_request_id
from services.control.keys import ApiKey, KeyRing
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2

WINDOW_US = 60_000_000
"""Limits are per minute; a key may spend up to a minute's allowance in a burst."""

_OUTCOMES = {
    control_pb2.OUTCOME_SUCCESS: "success",
    control_pb2.OUTCOME_FAILURE: "failure",
    control_pb2.OUTCOME_CANCELLED: "cancelled",
}


def _script(name: str) -> str:
    return resources.files("services.control").joinpath("lua", name).read_text()


def _per_unit_us(per_minute: int) -> float:
    return WINDOW_US / per_minute if per_minute else 0.0


class Keys:
    """Redis key names; all of a tenant's share its hash tag."""

    def __init__(self, tenant_id: str) -> None:
        self.base = f"strata:{{t:{tenant_id}}}"

    def request_rate(self, key_id: str) -> str:
        return f"{self.base}:rl:req:{key_id}"

    def token_rate(self, key_id: str) -> str:
        return f"{self.base}:rl:tok:{key_id}"

    def reservation(self, request_id: str) -> str:
        return f"{self.base}:resv:{request_id}"

    def settled(self, request_id: str) -> str:
        return f"{self.base}:settled:{request_id}"

    def tenant_usage(self) -> str:
        return f"{self.base}:usage"

    def key_usage(self, key_id: str) -> str:
        return f"{self.base}:usage:key:{key_id}"


@dataclass(frozen=True, slots=True)
class Admission:
    """A request that may run."""

    key: ApiKey
    plan: list[str]
    reserved_tokens: int


class RequestTooLarge(StrataError):
    """The request needs more tokens than the key's whole per-minute allowance."""

    code = RateLimited.code
    reason = "REQUEST_EXCEEDS_LIMIT"


class AdmissionControl:
    """Admits requests against their key's limits and settles what they used."""

    def __init__(
        self,
        keys: KeyRing,
        client: redis.Redis,
        reservation_ttl_s: int,
        settlement_ttl_s: int,
    ) -> None:
        self._keys = keys
        self._redis = client
        self._reservation_ttl_s = reservation_ttl_s
        self._settlement_ttl_s = settlement_ttl_s
        self._admit = client.register_script(_script("admit.lua"))
        self._settle = client.register_script(_script("settle.lua"))

    async def admit(self, request: control_pb2.AdmitRequest) -> Admission:
        """Authenticates the key, enforces its limits and reserves the request's tokens."""
        key = self._keys.authenticate(request.api_key)
        violations = [v for v in [check_request_id(request.request_id)] if v]
        if not request.model:
            violations.append(FieldViolation("model", "is required"))
        if request.estimated_input_tokens < 1:
            violations.append(FieldViolation("estimated_input_tokens", "must be at least 1"))
        if request.max_output_tokens < 1:
            violations.append(FieldViolation("max_output_tokens", "must be at least 1"))
        if violations:
            raise RequestInvalid(violations)

        tokens = request.estimated_input_tokens + request.max_output_tokens
        if key.tokens_per_minute and tokens > key.tokens_per_minute:
            raise RequestTooLarge(
                f"the request may use {tokens} tokens, more than the key's "
                f"{key.tokens_per_minute} tokens per minute",
                metadata={
                    "limit": "tokens_per_minute",
                    "limit_value": str(key.tokens_per_minute),
                    "requested": str(tokens),
                },
            )
        names = Keys(key.tenant_id)
        with redis_errors():
            admitted, value, detail = await self._admit(
                keys=[
                    names.request_rate(key.key_id),
                    names.token_rate(key.key_id),
                    names.reservation(request.request_id),
                ],
                args=[
                    _per_unit_us(key.requests_per_minute),
                    _per_unit_us(key.tokens_per_minute),
                    WINDOW_US,
                    tokens,
                    self._reservation_ttl_s,
                    key.key_id,
                ],
            )
        if not admitted:
            limit = detail.decode() if isinstance(detail, bytes) else str(detail)
            limit_value = (
                key.requests_per_minute if limit == "requests_per_minute" else key.tokens_per_minute
            )
            raise RateLimited(
                f"{limit} limit of key {key.key_id!r} reached",
                retry_after_s=int(value) / 1e6,
                metadata={"limit": limit, "limit_value": str(limit_value)},
            )
        return Admission(key=key, plan=[request.model], reserved_tokens=int(value))

    async def settle(self, request: control_pb2.SettleRequest) -> bool:
        """Records what a request used, once; True when this call recorded it."""
        violations = [v for v in [check_request_id(request.request_id)] if v]
        if not request.tenant_id:
            violations.append(FieldViolation("tenant_id", "is required"))
        if not request.key_id:
            violations.append(FieldViolation("key_id", "is required"))
        if request.outcome not in _OUTCOMES:
            violations.append(FieldViolation("outcome", "must be a known outcome"))
        usage, cost = request.usage, request.cost
        if min(usage.input_tokens, usage.output_tokens, cost.total_usd_micros) < 0:
            violations.append(FieldViolation("usage", "tokens and cost must not be negative"))
        if violations:
            raise RequestInvalid(violations)

        key = self._keys.get(request.tenant_id, request.key_id)
        names = Keys(request.tenant_id)
        with redis_errors():
            applied = await self._settle(
                keys=[
                    names.settled(request.request_id),
                    names.reservation(request.request_id),
                    names.token_rate(request.key_id),
                    names.tenant_usage(),
                    names.key_usage(request.key_id),
                ],
                args=[
                    self._settlement_ttl_s,
                    usage.input_tokens,
                    usage.output_tokens,
                    cost.total_usd_micros,
                    _per_unit_us(key.tokens_per_minute) if key else 0,
                    _OUTCOMES[request.outcome],
                    int(request.cache_status == common_pb2.CACHE_STATUS_HIT),
                    request.model,
                ],
            )
        return bool(applied)

    async def ping(self) -> None:
        """Raises unless Redis answers."""
        await self._redis.ping()
