"""Bounds of one process: how many calls it runs at once, and how big a server may grow.

Every call counts against `max_inflight` from the moment its request is parsed until it
ends (a stream until its last message, its error or its cancellation). A call past the
bound is refused at once, before any work, with RESOURCE_EXHAUSTED/OVERLOADED and a
RetryInfo: nothing is queued inside the process, so memory stays flat however many calls
arrive. Batch-priority calls (a request whose `priority` is PRIORITY_BATCH) may fill only
`batch_share` of the slots, so near the bound batch is refused while interactive calls
still get in. Health and reflection are never counted or refused.

Behind that, gRPC itself refuses (plain RESOURCE_EXHAUSTED) any message larger than
`max_message_bytes`, and a call when `hard_bound(max_inflight)` calls are open in the
server, refused ones and health checks included, so a flood of large messages cannot pile
up while it is being turned away.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from services.common.errors import Overloaded
from services.common.interception import Wrap, around_each_call
from strata.common.v1 import common_pb2

DEFAULT_PUBLIC_INFLIGHT = 256
DEFAULT_INTERNAL_INFLIGHT = 1024
UNCOUNTED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class InflightLimit:
    """Slots for the calls a process runs at once; batch may take only its share."""

    def __init__(self, limit: int, batch_share: float, retry_after_s: float) -> None:
        self.limit = limit
        self.batch_limit = max(1, int(limit * batch_share))
        self.inflight = 0
        # Built once: a refusal under a burst should cost next to nothing.
        self._refusals = {
            False: Overloaded(limit, "interactive", retry_after_s).to_status(),
            True: Overloaded(self.batch_limit, "batch", retry_after_s).to_status(),
        }

    def try_acquire(self, batch: bool) -> grpc.Status | None:
        """Takes a slot; when none is free, the status to refuse the call with."""
        if self.inflight >= (self.batch_limit if batch else self.limit):
            return self._refusals[batch]
        self.inflight += 1
        return None

    def release(self) -> None:
        """Frees the slot of a call that ended."""
        self.inflight -= 1


def _is_batch(request: Any) -> bool:
    return getattr(request, "priority", None) == common_pb2.PRIORITY_BATCH


def counting(limit: InflightLimit) -> Wrap:
    """Counts each call against `limit` until it ends; refuses it past the bound."""

    @contextlib.asynccontextmanager
    async def counted(request: Any, context: Any) -> AsyncIterator[None]:
        refusal = limit.try_acquire(_is_batch(request))
        if refusal is not None:
            await context.abort_with_status(refusal)
        try:
            yield
        finally:
            limit.release()

    def wrap(method: str, handler: Any) -> Any:
        if method.startswith(UNCOUNTED_PREFIXES):
            return handler
        return around_each_call(handler, counted)

    return wrap


def hard_bound(max_inflight: int) -> int:
    """Calls gRPC lets into the server at all: room for the counted calls, for the ones
    being refused, and for health checks."""
    return max(2 * max_inflight, max_inflight + 64)


def inflight_limit(
    max_inflight: int | None, internal: bool, batch_share: float, retry_after_s: float
) -> InflightLimit:
    """The limit of a process: `max_inflight`, or the default of its kind."""
    if max_inflight is None:
        max_inflight = DEFAULT_INTERNAL_INFLIGHT if internal else DEFAULT_PUBLIC_INFLIGHT
    return InflightLimit(max_inflight, batch_share, retry_after_s)
