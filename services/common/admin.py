"""What every admin API shares: a bearer token, and mutations applied once per request id.

A mutation's first answer is kept for a day under `<namespace>:<request id>`; a repeat gets
it back (a repeat arriving while the first is still running waits for it), and a request id
reused for another kind of call is refused.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import redis.asyncio as redis
from google.protobuf import message as protobuf_message

from services.common.errors import AdminTokenInvalid, RequestInProgress, RequestInvalid
from services.common.redis_state import redis_errors
from services.common.validation import check_request_id

IDEMPOTENCY_TTL_S = 24 * 3600
IN_PROGRESS = b"in-progress"
_M = TypeVar("_M", bound=protobuf_message.Message)


def bearer(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The token of `authorization: Bearer <token>` metadata, or ""."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return ""


def authorize(expected: str | None, presented: str) -> None:
    """Refuses unless `presented` is the configured admin token (none configured: refuse)."""
    if not expected or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise AdminTokenInvalid("admin token missing or invalid")


async def once(
    client: redis.Redis,
    namespace: str,
    request_id: str,
    response: type[_M],
    apply: Callable[[], Awaitable[_M]],
    kept: Callable[[_M], _M] = lambda answer: answer,
) -> _M:
    """Applies a mutation once per request id; repeats get the first answer (as `kept`
    leaves it: secrets in an answer are returned once and never stored)."""
    if violation := check_request_id(request_id):
        raise RequestInvalid([violation])
    slot = f"{namespace}:{request_id}"
    kind = response.DESCRIPTOR.full_name.encode()
    with redis_errors():
        claimed = await client.set(slot, IN_PROGRESS, nx=True, ex=60)
    if not claimed:
        return await _replay(client, slot, kind, response)
    try:
        result = await apply()
    except BaseException:
        with redis_errors():
            await client.delete(slot)
        raise
    with redis_errors():
        await client.set(
            slot, kind + b"\n" + kept(result).SerializeToString(), ex=IDEMPOTENCY_TTL_S
        )
    return result


async def _replay(client: redis.Redis, slot: str, kind: bytes, response: type[_M]) -> _M:
    for _ in range(100):
        with redis_errors():
            stored: Any = await client.get(slot)
        if stored is None:
            raise RequestInProgress("the first call with this request id failed; retry")
        if stored != IN_PROGRESS:
            stored_kind, _, body = stored.partition(b"\n")
            if stored_kind != kind:
                raise RequestInvalid.field("request_id", "was used for another call")
            return response.FromString(body)
        await asyncio.sleep(0.05)
    raise RequestInProgress("a call with this request id is still running")
