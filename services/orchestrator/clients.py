"""The orchestrator's clients of control, cache and executor: one channel each, per process.

Every call carries a timeout taken from the request's deadline and the request id; a
failure becomes the StrataError to raise, with the downstream reason unchanged.

Settlements and stores, sent after the reply, go through a `Coalescer`: one alone when
none is on its way, else those that piled up meanwhile as one SettleBatch or StoreBatch.
A batch call runs under a span of its own, linked to each request's span; control also
opens a span of each settlement in its request's trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Sequence
from typing import TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace

from services.common import semconv, telemetry
from services.common.calls import Deadline, request_metadata
from services.common.coalesce import Coalescer
from services.common.errors import from_rpc_error
from services.common.tasks import cancel_and_wait
from strata.cache.v1 import cache_pb2, cache_pb2_grpc
from strata.control.v1 import control_pb2, control_pb2_grpc
from strata.executor.v1 import executor_pb2, executor_pb2_grpc

_Resp = TypeVar("_Resp")
_Req = TypeVar("_Req")

AUDIT_TIMEOUT_S = 10.0
ADMIN_TIMEOUT_S = 10.0
HASHED = "sha256:"
"""A credential of the form `sha256:<hex>` names a key by its hash: async jobs run on behalf
of the key that queued them without holding it. The public edge refuses this form."""
SETTLE_ATTEMPTS = 3
"""Settle is idempotent by request id, so an UNAVAILABLE answer is safely tried again."""
KEEP_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)
"""Control did not take a settlement for now (down, stalled, overloaded): it is kept."""
MAX_KEPT = 100_000
RESEND_S = (0.5, 30.0)
"""First and longest wait before kept settlements are sent again (doubling in between)."""
FLUSH_S = 5.0
"""At shutdown, the longest last try to send the settlements still kept."""
MAX_BATCH = 100
"""The most settlements (or stores) one batch call carries."""
STORE_BATCH_TIMEOUT_FACTOR = 4
"""A StoreBatch of n answers may take min(n, this) times a store's timeout."""

log = logging.getLogger(__name__)


async def _unary(dependency: str, call: Awaitable[_Resp]) -> _Resp:
    try:
        return await call
    except grpc.aio.AioRpcError as err:
        raise from_rpc_error(err, dependency) from None


def _split_batch(err: BaseException) -> bool:
    """Whether a failed batch call's entries should go again one by one: yes unless the
    receiver was out of reach (each would fail the same way), e.g. one invalid entry, or a
    receiver without the batch method."""
    return isinstance(err, grpc.aio.AioRpcError) and err.code() not in KEEP_CODES


_Traced = tuple[_Req, otel_context.Context]
"""A request to send later and the trace context it was handed over in."""


def _batch_span(name: str, items: Sequence[_Traced[object]]) -> trace.Span:
    """The span of a batch call: a root of its own, linked to each request's span (a batch
    serves many traces and belongs to none)."""
    links = [
        trace.Link(context)
        for _, carried in items
        if (context := trace.get_current_span(carried).get_span_context()).is_valid
    ]
    return telemetry.tracer("orchestrator").start_span(
        name,
        context=otel_context.Context(),
        links=links,
        attributes={semconv.BATCH_SIZE: len(items)},
    )


def _traceparent(carried: otel_context.Context) -> str:
    carrier: dict[str, str] = {}
    telemetry.inject_context(carrier, carried)
    return carrier.get("traceparent", "")


class ControlClient:
    """Admission and settlement.

    A settlement control cannot take now (down, restarting, stalled, overloaded) is kept in
    memory and sent again in the background, in order, until control takes it: left alone,
    its reservation would hold the tenant's limits and then expire into a worst-case charge.
    At most MAX_KEPT are kept (`strata.settlements.kept`); those still kept when the process
    stops, after trying for FLUSH_S more, are lost (logged) and their reservations expire."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        admit_timeout_s: float,
        settle_timeout_s: float,
        linger_s: float = 0.0,
    ) -> None:
        self._stub = control_pb2_grpc.ControlServiceStub(channel)
        self._admit_timeout_s = admit_timeout_s
        self._settle_timeout_s = settle_timeout_s
        self._kept: deque[control_pb2.SettleRequest] = deque()
        self._resending: asyncio.Task[None] | None = None
        self._settling: Coalescer[_Traced[control_pb2.SettleRequest], None] = Coalescer(
            self._settle_one, self._settle_many, MAX_BATCH, _split_batch, linger_s
        )

    async def admit(
        self, request: control_pb2.AdmitRequest, deadline: Deadline
    ) -> control_pb2.AdmitResponse:
        if request.api_key.startswith(HASHED):
            request.api_key_sha256 = request.api_key.removeprefix(HASHED)
            request.api_key = ""
        return await _unary(
            "control",
            self._stub.Admit(
                request,
                timeout=deadline.cap(self._admit_timeout_s),
                metadata=request_metadata(request.request_id),
            ),
        )

    async def authenticate(
        self, api_key: str, deadline: Deadline
    ) -> control_pb2.AuthenticateResponse:
        return await _unary(
            "control",
            self._stub.Authenticate(
                control_pb2.AuthenticateRequest(api_key=api_key)
                if not api_key.startswith(HASHED)
                else control_pb2.AuthenticateRequest(api_key_sha256=api_key.removeprefix(HASHED)),
                timeout=deadline.cap(self._admit_timeout_s),
            ),
        )

    async def settle(self, request: control_pb2.SettleRequest, at_once: bool = False) -> bool:
        """Settles, trying again at once on UNAVAILABLE; runs after the client's deadline if
        need be. False: control could not take it now, it is kept and sent again later.
        Raises the StrataError of a settlement control refused. `at_once`: without waiting
        for others to go with it (its caller waits for it)."""
        for attempt in range(SETTLE_ATTEMPTS):
            try:
                await self._settling.submit((request, otel_context.get_current()), at_once)
                return True
            except grpc.aio.AioRpcError as err:
                if err.code() not in KEEP_CODES:
                    raise from_rpc_error(err, "control") from None
                if err.code() != grpc.StatusCode.UNAVAILABLE or attempt == SETTLE_ATTEMPTS - 1:
                    self._keep(request, err.code())
                    return False
                await asyncio.sleep(0.05 * 4**attempt)
        raise AssertionError("unreachable")

    def flush_settlements(self, stop: bool = False) -> None:
        """Sends the settlements waiting for others to join them now; `stop`: from now on
        each goes without waiting (see Coalescer.flush)."""
        self._settling.flush(stop)

    async def _settle_one(self, item: _Traced[control_pb2.SettleRequest]) -> None:
        await self._send(item[0])

    async def _settle_many(self, items: list[_Traced[control_pb2.SettleRequest]]) -> list[None]:
        batch = control_pb2.SettleBatchRequest(
            entries=[
                control_pb2.SettleBatchEntry(settlement=request, traceparent=_traceparent(carried))
                for request, carried in items
            ]
        )
        with trace.use_span(_batch_span(semconv.SPAN_SETTLEMENT_BATCH, items), end_on_exit=True):
            await self._stub.SettleBatch(batch, timeout=self._settle_timeout_s)
        return [None] * len(items)

    async def _send(self, request: control_pb2.SettleRequest, kept: bool = False) -> None:
        # A kept one waits (within the timeout) for the channel to connect again.
        await self._stub.Settle(
            request,
            timeout=self._settle_timeout_s,
            metadata=request_metadata(request.request_id),
            wait_for_ready=kept,
        )

    def _keep(self, request: control_pb2.SettleRequest, code: grpc.StatusCode) -> None:
        if len(self._kept) >= MAX_KEPT:
            log.error(
                "settlement of %s dropped (%s, %d kept already): its reservation will expire",
                request.request_id,
                code.name,
                len(self._kept),
            )
            return
        if not self._kept:
            log.warning("control does not take settlements (%s): kept, sent again", code.name)
        self._kept.append(request)
        self._count_kept()
        if self._resending is None or self._resending.done():
            self._resending = asyncio.create_task(self._resend(), name="kept settlements")

    def _count_kept(self) -> None:
        made = telemetry.instruments("orchestrator")
        made.gauge(semconv.METRIC_SETTLEMENTS_KEPT, float(len(self._kept)))

    async def _resend(self) -> None:
        delay = RESEND_S[0]
        while self._kept:
            await asyncio.sleep(delay)
            delay = RESEND_S[0] if await self._send_kept() else min(delay * 2, RESEND_S[1])

    async def _send_kept(self) -> bool:
        """Sends the kept settlements in order; False when control still does not take
        them (the rest stay kept)."""
        sent = 0
        try:
            while self._kept:
                request = self._kept[0]
                try:
                    await self._send(request, kept=True)
                except grpc.aio.AioRpcError as err:
                    if err.code() in KEEP_CODES:
                        return False
                    log.error(
                        "kept settlement of %s refused (%s): its reservation will expire",
                        request.request_id,
                        from_rpc_error(err, "control").reason,
                    )
                self._kept.popleft()
                sent += 1
            log.warning("control takes settlements again: %d kept ones sent", sent)
            return True
        finally:
            self._count_kept()

    async def aclose(self) -> None:
        """Last tries (for at most FLUSH_S) for the settlements still kept; the rest are lost."""
        if self._resending is not None:
            await cancel_and_wait(self._resending)
        if not self._kept:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLUSH_S):
                while self._kept:
                    if not await self._send_kept():
                        await asyncio.sleep(0.1)  # the channel may be between tries
        if self._kept:
            log.error(
                "%d kept settlements lost at shutdown: their reservations will expire",
                len(self._kept),
            )


class CacheClient:
    """Lookups and stores, each bounded by the cache timeout."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        timeout_s: float,
        admin_token: str | None = None,
        linger_s: float = 0.0,
    ) -> None:
        self._stub = cache_pb2_grpc.CacheServiceStub(channel)
        self._admin = cache_pb2_grpc.CacheAdminServiceStub(channel)
        self._admin_metadata = (("authorization", f"Bearer {admin_token or ''}"),)
        self._timeout_s = timeout_s
        self._storing: Coalescer[_Traced[cache_pb2.StoreRequest], cache_pb2.StoreResponse] = (
            Coalescer(self._store_one, self._store_many, MAX_BATCH, _split_batch, linger_s)
        )

    async def forget_documents(self, tenant_id: str, document_ids: Sequence[str]) -> None:
        """Drops the cached answers grounded on these documents (any version)."""
        for document_id in document_ids:
            await _unary(
                "cache",
                self._admin.Invalidate(
                    cache_pb2.InvalidateRequest(
                        request_id=uuid.uuid4().hex, tenant_id=tenant_id, document_id=document_id
                    ),
                    timeout=ADMIN_TIMEOUT_S,
                    metadata=self._admin_metadata,
                ),
            )

    async def lookup(
        self, request: cache_pb2.LookupRequest, deadline: Deadline, request_id: str
    ) -> cache_pb2.LookupResponse:
        return await _unary(
            "cache",
            self._stub.Lookup(
                request,
                timeout=deadline.cap(self._timeout_s),
                metadata=request_metadata(request_id),
            ),
        )

    async def audit(
        self, request: cache_pb2.AuditRequest, request_id: str
    ) -> cache_pb2.AuditResponse:
        return await _unary(
            "cache",
            self._stub.Audit(
                request, timeout=AUDIT_TIMEOUT_S, metadata=request_metadata(request_id)
            ),
        )

    async def store(
        self, request: cache_pb2.StoreRequest, at_once: bool = False
    ) -> cache_pb2.StoreResponse:
        """Stores an answer; `at_once`: without waiting for others to go with it."""
        return await _unary(
            "cache", self._storing.submit((request, otel_context.get_current()), at_once)
        )

    def flush_stores(self, stop: bool = False) -> None:
        """Sends the stores waiting for others to join them now; `stop`: from now on each
        goes without waiting (see Coalescer.flush)."""
        self._storing.flush(stop)

    async def _store_one(self, item: _Traced[cache_pb2.StoreRequest]) -> cache_pb2.StoreResponse:
        request = item[0]
        return await self._stub.Store(
            request, timeout=self._timeout_s, metadata=request_metadata(request.answer.request_id)
        )

    async def _store_many(
        self, items: list[_Traced[cache_pb2.StoreRequest]]
    ) -> list[cache_pb2.StoreResponse]:
        batch = cache_pb2.StoreBatchRequest(entries=[request for request, _ in items])
        # The cache embeds a batch's questions together: more time than one store, far less
        # than one each.
        timeout = self._timeout_s * min(len(items), STORE_BATCH_TIMEOUT_FACTOR)
        with trace.use_span(_batch_span(semconv.SPAN_CACHE_STORE_BATCH, items), end_on_exit=True):
            stored = await self._stub.StoreBatch(batch, timeout=timeout)
        return [cache_pb2.StoreResponse(entry_id=entry_id) for entry_id in stored.entry_ids]


class ExecutorClient:
    """Model calls, bounded by the request's deadline."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = executor_pb2_grpc.ExecutorServiceStub(channel)

    async def embed(
        self, request: executor_pb2.EmbedRequest, deadline: Deadline
    ) -> executor_pb2.EmbedResponse:
        return await _unary(
            "executor",
            self._stub.Embed(
                request,
                timeout=deadline.remaining(),
                metadata=request_metadata(request.request_id),
            ),
        )

    async def complete(
        self, request: executor_pb2.CompleteRequest, deadline: Deadline
    ) -> executor_pb2.CompleteResponse:
        return await _unary(
            "executor",
            self._stub.Complete(
                request,
                timeout=deadline.remaining(),
                metadata=request_metadata(request.request_id),
            ),
        )

    async def stream(
        self, request: executor_pb2.StreamCompleteRequest, deadline: Deadline
    ) -> AsyncGenerator[executor_pb2.StreamCompleteResponse, None]:
        """The executor's chunks; closing this iterator cancels the executor call."""
        call = self._stub.StreamComplete(
            request, timeout=deadline.remaining(), metadata=request_metadata(request.request_id)
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err, "executor") from None
        finally:
            call.cancel()
