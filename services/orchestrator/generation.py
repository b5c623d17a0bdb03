"""One generate request, from validation to settlement.

    [request id: claim it, or replay / wait for its first call]
    prepare (route, retrieval, template) ──► Admit (control) ─┬─► hit:  replay the answer
                                             Lookup (cache) ──┘   miss: single flight, then
        walk the plan: StreamComplete (executor) per candidate until one answers ──► Store, Settle

Admission and the cache lookup run side by side: the lookup's scope needs the tenant, so it
uses the tenant this process last saw for the key and is thrown away (and done again) when
Admit names another tenant or redacts the conversation. A hit is served only after Admit.

The plan is control's ordered list of candidate models. A candidate that fails before its
answer starts, for a reason another model may not share (unavailable, rate limited, out of
quota, too small a context...), hands over to the next one while the deadline allows; once
an answer has started, a failure ends the stream. Output guardrails watch a streamed answer
as it goes and cut it with GUARDRAIL_BLOCKED; a whole answer is checked before it is sent.

When a call completes, its usage is settled (with every attempt, for the circuit breakers)
and its answer stored right after the reply, side by side, in the background, each gathered
with other requests' into one call (`after_reply_linger_s`); the single flight ends once the
answer is stored. A job's run stores and settles before it ends (see
RERUN_IF_CUT). A failed or cancelled call is settled in the background with what it used as
far as known.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2
from opentelemetry import trace

from services.common import semconv, telemetry
from services.common.calls import RERUN_IF_CUT, Deadline, never_rerun
from services.common.catalog import Catalog
from services.common.chat import assemble_tool_calls, tool_call_pieces
from services.common.errors import (
    GuardrailBlocked,
    StrataError,
    StreamInterrupted,
)
from services.common.guardrails import Action, Guardrails, Verdict
from services.common.logs import bind_request_id
from services.common.tasks import Background, cancel_and_wait
from services.orchestrator.clients import CacheClient, ControlClient, ExecutorClient
from services.orchestrator.idempotency import (
    FlightClaim,
    IdempotencyStore,
    SingleFlight,
    body_hash,
)
from services.orchestrator.preparation import Prepared, Preparer, check_shape
from services.orchestrator.records import RecordStore
from services.orchestrator.routes import LatencyTracker
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2
from strata.executor.v1 import executor_pb2
from strata.orchestrator.v1 import orchestrator_pb2, traces_pb2

log = logging.getLogger(__name__)

GenerateRequest = orchestrator_pb2.GenerateRequest | orchestrator_pb2.StreamGenerateRequest

AUDIT_DEADLINE_S = 120.0
REPLAY_CHUNK_CHARS = 64
"""A cached answer streams back in pieces of this many characters, like a live one."""
TENANT_MEMO_SIZE = 10_000
TENANT_MEMO_S = 10.0
"""How long a key's tenant is remembered (a revoked key is still refused by Admit)."""
SETTLEMENT_WAIT_S = 1.0
"""Longest an admission refused for capacity waits for this replica's settlements of the
tenant under way before it asks again."""
HELD_BY_SETTLEMENTS = frozenset({"CONCURRENCY_LIMITED", "RATE_LIMITED", "BUDGET_EXCEEDED"})
"""Refusals that a reservation still held by an answered request can cause."""
REFUSED_MEMO_S = 1.0
"""For this long after one of a tenant's admissions was refused, its requests send no
single-flight claim beside their admission (only once admitted): a tenant refused over and
over costs Redis no claims and releases for requests that never run."""
STORED_GRACE_S = 5.0
"""How long after storing an answer in the background an identical request of the same
replica that misses still waits for that store and looks again (a lookup that began just
before the store landed)."""

_STORABLE = {
    common_pb2.FINISH_REASON_STOP,
    common_pb2.FINISH_REASON_LENGTH,
    common_pb2.FINISH_REASON_TOOL_CALLS,
}
"""Answers worth reusing; a filtered answer is not."""
FALLBACK_REASONS = frozenset(
    {
        "PROVIDER_UNAVAILABLE",
        "PROVIDER_AUTH_FAILED",
        "UPSTREAM_RATE_LIMITED",
        "UPSTREAM_QUOTA_EXHAUSTED",
        "UPSTREAM_TIMEOUT",
        "BAD_UPSTREAM_RESPONSE",
        "CONTEXT_LENGTH_EXCEEDED",
        "STREAM_INTERRUPTED",
        "EXECUTOR_UNAVAILABLE",
    }
)
"""Failures before the answer started that the next candidate model may not share."""
_ACTIONS = {
    Action.BLOCK: control_pb2.GUARDRAIL_ACTION_BLOCK,
    Action.REDACT: control_pb2.GUARDRAIL_ACTION_REDACT,
    Action.FLAG: control_pb2.GUARDRAIL_ACTION_FLAG,
}


@dataclass(frozen=True, slots=True)
class Started:
    """The first event: who answers and whether from the cache."""

    request_id: str
    model: str
    cache_status: common_pb2.CacheStatus
    cache_match: common_pb2.CacheMatch = common_pb2.CACHE_MATCH_UNSPECIFIED
    prompt: orchestrator_pb2.PromptInfo | None = None


@dataclass(frozen=True, slots=True)
class ToolPieces:
    """Pieces of tool calls, in order."""

    pieces: Sequence[common_pb2.ToolCallDelta]


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a complete answer."""

    finish_reason: common_pb2.FinishReason
    usage: common_pb2.Usage
    cost: common_pb2.Cost
    cache_status: common_pb2.CacheStatus
    citations: Sequence[orchestrator_pb2.Citation] = ()
    retrieval_degraded: bool = False
    """Retrieval failed and the answer was made without documents."""


Event = Started | str | ToolPieces | Finished
"""A generation streams Started, then text pieces (str) and ToolPieces, then Finished."""


class Answer:
    """Collects a generation's events into one GenerateResponse (unary calls, replays)."""

    def __init__(self) -> None:
        self.response = orchestrator_pb2.GenerateResponse()
        self._text: list[str] = []
        self._pieces: list[common_pb2.ToolCallDelta] = []

    def add(self, event: Event) -> None:
        """Takes the next event."""
        response = self.response
        if isinstance(event, str):
            self._text.append(event)
        elif isinstance(event, ToolPieces):
            self._pieces.extend(event.pieces)
        elif isinstance(event, Started):
            response.request_id = event.request_id
            response.model = event.model
            response.cache_match = event.cache_match
            if event.prompt is not None:
                response.prompt.CopyFrom(event.prompt)
        else:
            response.finish_reason = event.finish_reason
            response.usage.CopyFrom(event.usage)
            response.cost.CopyFrom(event.cost)
            response.cache_status = event.cache_status
            response.citations.extend(event.citations)
            response.retrieval_degraded = event.retrieval_degraded

    def build(self) -> orchestrator_pb2.GenerateResponse:
        """The whole answer."""
        self.response.text = "".join(self._text)
        del self.response.tool_calls[:]
        self.response.tool_calls.extend(assemble_tool_calls(self._pieces))
        return self.response


def replay(response: orchestrator_pb2.GenerateResponse) -> list[Event]:
    """A stored answer as the events of a live one."""
    events: list[Event] = [
        Started(
            response.request_id,
            response.model,
            response.cache_status,
            response.cache_match,
            response.prompt,
        )
    ]
    events += [
        response.text[i : i + REPLAY_CHUNK_CHARS]
        for i in range(0, len(response.text), REPLAY_CHUNK_CHARS)
    ]
    if response.tool_calls:
        events.append(ToolPieces(tool_call_pieces(response.tool_calls)))
    events.append(
        Finished(
            response.finish_reason,
            response.usage,
            response.cost,
            response.cache_status,
            list(response.citations),
            response.retrieval_degraded,
        )
    )
    return events


@dataclass(slots=True)
class _Clock:
    """When a request began and how long each stage took, for its record."""

    trace_id: str
    create_time: timestamp_pb2.Timestamp
    begun: float = field(default_factory=time.monotonic)
    stages: list[tuple[str, float]] = field(default_factory=list)
    last: float = 0.0

    def lap(self, stage: str) -> None:
        """Ends `stage` now (it began when the previous one ended)."""
        now = time.monotonic()
        self.stages.append((stage, now - (self.last or self.begun)))
        self.last = now


@dataclass(slots=True)
class _Call:
    """What every step of one request needs: the prepared request and its admission."""

    prepared: Prepared
    admission: control_pb2.AdmitResponse
    messages: Sequence[common_pb2.ChatMessage]
    """The conversation as the model sees it (redacted by the input guardrails if need be)."""
    stream: bool
    clock: _Clock

    @property
    def request_id(self) -> str:
        return self.prepared.request_id

    @property
    def request(self) -> GenerateRequest:
        return self.prepared.request

    @property
    def deadline(self) -> Deadline:
        return self.prepared.deadline


@dataclass(slots=True)
class _Tally:
    """What a request has used so far, for its settlement."""

    cache_status: common_pb2.CacheStatus
    model: str = ""
    outcome: control_pb2.Outcome = control_pb2.OUTCOME_FAILURE
    accepted: bool = False
    finish_reason: common_pb2.FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED
    output_bytes: int = 0
    usage: common_pb2.Usage | None = None
    cost: common_pb2.Cost | None = None
    text: list[str] = field(default_factory=list)
    tool_pieces: list[common_pb2.ToolCallDelta] = field(default_factory=list)
    attempts: list[control_pb2.Attempt] = field(default_factory=list)
    findings: list[control_pb2.GuardrailFinding] = field(default_factory=list)
    error: str = ""
    """The reason the request failed with ('' when it did not)."""
    cache_match: common_pb2.CacheMatch = common_pb2.CACHE_MATCH_UNSPECIFIED
    cache_similarity: float = 0.0
    attempt_began: float = 0.0
    first_token_s: dict[int, float] = field(default_factory=dict)
    """Time to the first token of each streamed attempt, by its index."""


@dataclass(frozen=True, slots=True)
class _Known:
    """What this process remembers of a key."""

    tenant_id: str
    tier: str | None
    """None: not asked yet (admission tells the tenant, not the tier)."""
    until: float


class Generator:
    """Runs generate requests across control, cache and executor."""

    def __init__(
        self,
        catalog: Catalog,
        guardrails: Guardrails,
        control: ControlClient,
        cache: CacheClient,
        executor: ExecutorClient,
        preparer: Preparer,
        idempotency: IdempotencyStore,
        flight: SingleFlight,
        latencies: LatencyTracker,
        audit_rate: float = 0.0,
        records: RecordStore | None = None,
    ) -> None:
        self._catalog = catalog
        self._guardrails = guardrails
        self._control = control
        self._cache = cache
        self._executor = executor
        self._preparer = preparer
        self._idempotency = idempotency
        self._flight = flight
        self._latencies = latencies
        self._audit_rate = audit_rate
        self._records = records
        self._tenant_of_key: dict[bytes, _Known] = {}
        self._background = Background()
        self._unsettled: dict[str, set[asyncio.Future[None]]] = {}
        """Settlements under way, by tenant."""
        self._storing: dict[tuple[str, str], asyncio.Future[None]] = {}
        """Stores after the reply, by tenant and exact key (kept STORED_GRACE_S after)."""
        self._refused_until: dict[str, float] = {}
        """Tenants with an admission refused lately, until when (see REFUSED_MEMO_S)."""

    async def generate(
        self, request: GenerateRequest, api_key: str, deadline: Deadline, *, stream: bool
    ) -> AsyncGenerator[Event, None]:
        """Events of one request; raises StrataError with the reason when it fails."""
        # Before the request id is claimed: a malformed request leaves nothing behind.
        check_shape(request)
        if not request.request_id:
            async with aclosing(self._generate(request, api_key, deadline, stream)) as events:
                async for event in events:
                    yield event
            return
        bind_request_id(request.request_id)
        tenant = await self.tenant_of(api_key, deadline)
        digest = body_hash(request)
        first = await self._idempotency.claim(tenant, request.request_id, digest, deadline)
        if isinstance(first, orchestrator_pb2.GenerateResponse):
            for event in replay(first):
                yield event
            return
        answer = Answer()
        keeper = asyncio.create_task(self._idempotency.keep(tenant, request.request_id, first))
        try:
            async with aclosing(self._generate(request, api_key, deadline, stream)) as events:
                async for event in events:
                    answer.add(event)
                    yield event
        except BaseException:
            self._background.run(self._idempotency.release(tenant, request.request_id, first))
            raise
        finally:
            await cancel_and_wait(keeper)
        try:
            await self._idempotency.complete(tenant, request.request_id, digest, answer.build())
        except StrataError as err:
            # The answer is whole (a stream's final chunk is sent): failing the call now
            # would have its client run it again. The id stays claimed until its lease
            # lapses; a repeat then runs the request again.
            log.warning("answer of %s not kept for repeats (%s)", request.request_id, err.reason)

    async def tenant_of(self, api_key: str, deadline: Deadline) -> str:
        """The key's tenant: remembered for a few seconds, else asked of control."""
        fingerprint = hashlib.sha256(api_key.encode()).digest()
        known = self._tenant_of_key.get(fingerprint)
        if known is not None and known.until > time.monotonic():
            return known.tenant_id
        return (await self._identify(fingerprint, api_key, deadline)).tenant_id

    async def tier_of(self, api_key: str, deadline: Deadline) -> str:
        """The tier of the key's tenant, remembered like the tenant."""
        fingerprint = hashlib.sha256(api_key.encode()).digest()
        known = self._tenant_of_key.get(fingerprint)
        if known is not None and known.tier is not None and known.until > time.monotonic():
            return known.tier
        return (await self._identify(fingerprint, api_key, deadline)).tier or ""

    async def _identify(self, fingerprint: bytes, api_key: str, deadline: Deadline) -> _Known:
        who = await self._control.authenticate(api_key, deadline)
        return self._remember_tenant(fingerprint, who.tenant_id, who.tier)

    def _remember_tenant(self, fingerprint: bytes, tenant_id: str, tier: str | None) -> _Known:
        if len(self._tenant_of_key) >= TENANT_MEMO_SIZE:
            self._tenant_of_key.clear()
        old = self._tenant_of_key.get(fingerprint)
        if tier is None and old is not None and old.tenant_id == tenant_id:
            tier = old.tier
        known = _Known(tenant_id, tier, time.monotonic() + TENANT_MEMO_S)
        self._tenant_of_key[fingerprint] = known
        return known

    async def _generate(
        self, request: GenerateRequest, api_key: str, deadline: Deadline, stream: bool
    ) -> AsyncGenerator[Event, None]:
        clock = _Clock(telemetry.current_trace_id(), _now())
        prepared = await self._preparer.prepare(
            request,
            deadline,
            lambda: self.tenant_of(api_key, deadline),
            lambda: self.tier_of(api_key, deadline),
        )
        clock.lap("prepare")
        bind_request_id(prepared.request_id)
        prompt = prepared.prompt
        telemetry.set_attributes(
            {
                semconv.REQUEST_ID: prepared.request_id,
                semconv.MODEL: prepared.model,
                semconv.ROUTE: prompt.route or None,
                semconv.TEMPLATE: prompt.template or None,
                semconv.PROMPT_HASH: prompt.prompt_hash or None,
            }
        )
        call, found, cache_status, claim = await self._admit_and_lookup(
            prepared, api_key, stream, clock
        )
        telemetry.set_attributes({semconv.TENANT_ID: call.admission.tenant_id})
        tally = _Tally(cache_status=cache_status)
        config = prepared.config
        hit = found if found is not None and found.match else None
        if hit is not None:
            tally.cache_match, tally.cache_similarity = hit.match, hit.similarity
        settling: asyncio.Future[None] | None = None
        try:
            if hit is not None:
                tally.model = config.name
                tally.usage, tally.cost = common_pb2.Usage(), common_pb2.Cost()
                for event in self._replay_hit(call, hit, cache_status):
                    yield event
            else:
                async with AsyncExitStack() as flight:
                    again = await flight.enter_async_context(
                        self._single_flight(call, found, claim)
                    )
                    if again is not None:
                        # An identical request just finished: its answer is in the cache.
                        hit, tally.cache_status = again, common_pb2.CACHE_STATUS_HIT
                        tally.cache_match, tally.cache_similarity = again.match, again.similarity
                        tally.model = config.name
                        tally.usage, tally.cost = common_pb2.Usage(), common_pb2.Cost()
                        for event in self._replay_hit(call, again, tally.cache_status):
                            yield event
                    else:
                        async with aclosing(self._run_plan(call, tally)) as events:
                            async for event in events:
                                yield event
                        if RERUN_IF_CUT.get() is never_rerun:
                            # The answer is whole and sent: settle it and store it after
                            # the reply (the single flight ends once it is stored).
                            tally.outcome = control_pb2.OUTCOME_SUCCESS
                            settling = self._settle_later(call, tally)
                            if prepared.writes:
                                self._store_after(call, tally, found, flight.pop_all())
                        elif prepared.writes:
                            # A job's run stores and settles before it ends: see
                            # RERUN_IF_CUT.
                            await self._store(call, tally)
            tally.outcome = control_pb2.OUTCOME_SUCCESS
        except (asyncio.CancelledError, GeneratorExit):
            if settling is not None:
                raise  # the answer was whole: its settlement goes on in the background
            tally.outcome = control_pb2.OUTCOME_CANCELLED
            tally.error = "CANCELLED"
            if not RERUN_IF_CUT.get()():
                self._settle_later(call, tally)
            raise
        except Exception as err:
            if settling is not None:
                raise
            tally.error = err.reason if isinstance(err, StrataError) else "INTERNAL"
            if tally.error == "DEADLINE_EXCEEDED":
                # The caller's deadline passed: it gave up, as with a cancel. Whether the
                # executor's reply or this call's own cancel comes first is a race; both are
                # settled as cancelled.
                tally.outcome = control_pb2.OUTCOME_CANCELLED
            if isinstance(err, StrataError) and err.reason == "STREAM_INTERRUPTED":
                # The executor counted what the broken stream used; charge that.
                tally.usage = usage_of_interruption(err.metadata)
                model = self._catalog.get(tally.model) or config
                tally.cost = model.cost(tally.usage) if tally.usage else None
            self._settle_later(call, tally)
            raise
        if settling is None:
            # A cache hit: settled after the reply too (a job's run, before it ends).
            if RERUN_IF_CUT.get() is never_rerun:
                self._settle_later(call, tally)
            else:
                await self._settle(call, tally)
        semantic = hit is not None and hit.match == common_pb2.CACHE_MATCH_SEMANTIC
        if semantic and self._audit_rate and random.random() < self._audit_rate:
            assert hit is not None
            self._background.run(self._audit(call, hit.entry_id))

    def _replay_hit(
        self, call: _Call, found: cache_pb2.LookupResponse, status: common_pb2.CacheStatus
    ) -> list[Event]:
        cached = found.answer
        prepared = call.prepared
        return replay(
            orchestrator_pb2.GenerateResponse(
                request_id=call.request_id,
                model=prepared.config.name,
                text=cached.text,
                finish_reason=cached.finish_reason,
                usage=cached.usage,
                cost=common_pb2.Cost(),
                cache_status=status,
                tool_calls=cached.tool_calls,
                cache_match=found.match,
                citations=prepared.citations,
                prompt=prepared.prompt,
                retrieval_degraded=prepared.retrieval_degraded,
            )
        )

    def _store_after(
        self,
        call: _Call,
        tally: _Tally,
        found: cache_pb2.LookupResponse | None,
        flight: AsyncExitStack,
    ) -> None:
        """Stores the answer in the background, then ends the request's single flight
        (identical requests waiting on it find the answer stored). Until then, and for
        STORED_GRACE_S after, an identical request of this replica that misses waits for
        the store and looks again, so a client repeating a question gets the answer it
        was just sent from the cache."""
        key = (call.admission.tenant_id, found.exact_key) if found and found.exact_key else None

        async def store() -> None:
            async with flight:
                # Unseen by a lookup (a write-only request), nothing here can wait for it:
                # it goes without waiting for others, to be found by the next request.
                await self._store(call, tally, at_once=key is None)

        task = self._background.run(store())
        if key is not None:
            self._storing[key] = task

            def forget(_: object) -> None:
                loop = asyncio.get_running_loop()
                loop.call_later(STORED_GRACE_S, self._forget_store, key, task)

            task.add_done_callback(forget)

    def _forget_store(self, key: tuple[str, str], task: asyncio.Future[None]) -> None:
        if self._storing.get(key) is task:
            del self._storing[key]

    async def _stored_here(
        self, call: _Call, found: cache_pb2.LookupResponse
    ) -> cache_pb2.LookupResponse | None:
        """The cache's answer when this replica just stored (or is storing) an identical
        request's: waits for that store, then looks again. None otherwise."""
        pending = self._storing.get((call.admission.tenant_id, found.exact_key))
        if pending is None:
            return None
        # (A store that failed or was cancelled at shutdown is just not there: look anyway.)
        self._cache.flush_stores()  # needed now: not after the linger
        await asyncio.wait({pending}, timeout=call.deadline.remaining())
        prepared = call.prepared
        again, status = await self._lookup(prepared, call.messages, call.admission.tenant_id)
        return again if again is not None and status == common_pb2.CACHE_STATUS_HIT else None

    @asynccontextmanager
    async def _single_flight(
        self,
        call: _Call,
        found: cache_pb2.LookupResponse | None,
        claim: FlightClaim | None,
    ) -> AsyncIterator[cache_pb2.LookupResponse | None]:
        """Runs the body once per identical cacheable request at a time (across replicas).
        `claim` is the one sent beside the admission, if any.

        Yields None when this call must answer (it leads, or nothing to share); or the
        cache's answer, stored by the identical request this one waited for."""
        prepared = call.prepared
        if found is None or not found.exact_key or not (prepared.reads and prepared.writes):
            yield None
            return
        try:
            stored = await self._stored_here(call, found)
        except BaseException:
            self._flight.withdraw(claim)
            raise
        if stored is not None:
            self._flight.withdraw(claim)
            yield stored
            return
        async with self._flight.leader(
            call.admission.tenant_id, found.exact_key, call.deadline, claim
        ) as leads:
            if leads:
                yield None
                return
            again, status = await self._lookup(prepared, call.messages, call.admission.tenant_id)
            yield again if again is not None and status == common_pb2.CACHE_STATUS_HIT else None

    async def _admit_and_lookup(
        self, prepared: Prepared, api_key: str, stream: bool, clock: _Clock
    ) -> tuple[_Call, cache_pb2.LookupResponse | None, common_pb2.CacheStatus, FlightClaim | None]:
        """Admission, and beside it the cache lookup (with the tenant this process last saw
        for the key) and, when that misses, the single-flight claim the call would make
        next. A claim made for nothing (the admission refused, or naming another tenant) is
        withdrawn."""
        fingerprint = hashlib.sha256(api_key.encode()).digest()
        known = self._tenant_of_key.get(fingerprint) if prepared.reads else None
        predicted = known.tenant_id if known is not None else None
        early = (
            asyncio.create_task(
                self._look_ahead(
                    prepared,
                    predicted,
                    prepared.messages,
                    claims=self._refused_until.get(predicted, 0.0) < time.monotonic(),
                )
            )
            if predicted
            else None
        )
        admit = control_pb2.AdmitRequest(
            request_id=prepared.request_id,
            api_key=api_key,
            model=prepared.model,
            estimated_input_tokens=prepared.estimated_input,
            max_output_tokens=prepared.max_output,
            priority=prepared.request.priority,
            messages=prepared.messages,
            candidates=prepared.candidates,
            guardrail_profile=prepared.guardrail_profile,
        )
        if prepared.max_cost_usd_micros is not None:
            admit.max_cost_usd_micros = prepared.max_cost_usd_micros
        try:
            with _span(semconv.SPAN_ADMISSION) as span:
                try:
                    admission = await self._admit(admit, prepared.deadline, predicted)
                except StrataError as err:
                    span.set_attributes(
                        {
                            semconv.ADMISSION_DECISION: "refused",
                            semconv.ADMISSION_REASON: err.reason,
                        }
                    )
                    if predicted:
                        self._refused(predicted)
                    raise
                span.set_attributes(
                    {
                        semconv.ADMISSION_DECISION: "admitted",
                        semconv.RESERVED_USD_MICROS: admission.reserved_usd_micros,
                        semconv.PLAN: [c.model for c in admission.plan],
                        semconv.TENANT_ID: admission.tenant_id,
                    }
                )
                if admission.guardrail_findings:
                    span.set_attribute(
                        semconv.GUARDRAIL_RULES, [f.rule for f in admission.guardrail_findings]
                    )
        except BaseException:
            if early is not None:
                self._abandon(early)
            raise
        clock.lap("admission")
        self._remember_tenant(fingerprint, admission.tenant_id, None)
        messages = admission.redacted_messages or prepared.messages
        call = _Call(prepared, admission, messages, stream, clock)
        if not prepared.reads:
            if early is not None:
                self._abandon(early)
            return call, None, common_pb2.CACHE_STATUS_BYPASS, None
        if early is None or predicted != admission.tenant_id or admission.redacted_messages:
            if early is not None:
                self._abandon(early)
            early = asyncio.create_task(self._look_ahead(prepared, admission.tenant_id, messages))
        try:
            found, status, claim = await early
            clock.lap("cache_lookup")
        except BaseException as err:
            # Cancelled while the cache answered: nothing ran, but the admission holds a
            # reservation; settle it now, or it would expire into a worst-case charge.
            self._abandon(early)
            tally = _Tally(cache_status=common_pb2.CACHE_STATUS_MISS)
            if isinstance(err, asyncio.CancelledError | GeneratorExit):
                tally.outcome = control_pb2.OUTCOME_CANCELLED
                if RERUN_IF_CUT.get()():
                    raise
            self._settle_later(call, tally)
            raise
        return call, found, status, claim

    async def _look_ahead(
        self,
        prepared: Prepared,
        tenant_id: str,
        messages: Sequence[common_pb2.ChatMessage],
        claims: bool = True,
    ) -> tuple[cache_pb2.LookupResponse | None, common_pb2.CacheStatus, FlightClaim | None]:
        """The cache lookup, then (if it `claims`), on a miss the call would answer and
        share, its single-flight claim, sent at once (not waited for)."""
        found, status = await self._lookup(prepared, messages, tenant_id)
        claim = None
        if (
            claims
            and status == common_pb2.CACHE_STATUS_MISS
            and found is not None
            and found.exact_key
            and prepared.writes
            and (tenant_id, found.exact_key) not in self._storing
        ):
            claim = self._flight.claim(tenant_id, found.exact_key)
        return found, status, claim

    def _refused(self, tenant_id: str) -> None:
        if len(self._refused_until) >= TENANT_MEMO_SIZE:
            self._refused_until.clear()
        self._refused_until[tenant_id] = time.monotonic() + REFUSED_MEMO_S

    def _abandon(self, early: asyncio.Task[Any]) -> None:
        """Drops a look-ahead, withdrawing the claim it made."""
        if not early.done():
            early.cancel()  # (a look-ahead cut before it returns has made no claim)
        elif not early.cancelled() and early.exception() is None:
            self._flight.withdraw(early.result()[2])

    async def _admit(
        self, admit: control_pb2.AdmitRequest, deadline: Deadline, tenant: str | None
    ) -> control_pb2.AdmitResponse:
        """Control's admission. Answered requests of this replica hold their reservations
        (their worst case, a place in the tenant's concurrency) until their settlements,
        which run after the replies, land: a refusal for capacity while some of the
        tenant's are under way waits for them (at most SETTLEMENT_WAIT_S) and asks again,
        once, so a client that sends its next request as soon as it has an answer is not
        refused for the one it was just given."""
        try:
            return await self._control.admit(admit, deadline)
        except StrataError as err:
            pending = self._unsettled.get(tenant) if tenant else None
            if err.reason not in HELD_BY_SETTLEMENTS or not pending:
                raise
        self._control.flush_settlements()  # needed now: not after the linger
        await asyncio.wait(set(pending), timeout=min(SETTLEMENT_WAIT_S, deadline.remaining()))
        return await self._control.admit(admit, deadline)

    def _settle_later(self, call: _Call, tally: _Tally) -> asyncio.Future[None]:
        """Settles in the background; the tenant's settlements under way are tracked."""
        tenant = call.admission.tenant_id
        task = self._background.run(self._settle(call, tally))
        pending = self._unsettled.setdefault(tenant, set())
        pending.add(task)

        def done(_: object) -> None:
            pending.discard(task)
            if not pending and self._unsettled.get(tenant) is pending:
                del self._unsettled[tenant]

        task.add_done_callback(done)
        return task

    async def _lookup(
        self,
        prepared: Prepared,
        messages: Sequence[common_pb2.ChatMessage],
        tenant_id: str,
    ) -> tuple[cache_pb2.LookupResponse | None, common_pb2.CacheStatus]:
        """The cache's reply and the cache status; a failing cache counts as a miss."""
        with _span(semconv.SPAN_CACHE_LOOKUP) as span:
            try:
                found = await self._cache.lookup(
                    cache_pb2.LookupRequest(
                        scope=_scope(tenant_id, prepared.model, prepared), messages=messages
                    ),
                    prepared.deadline,
                    prepared.request_id,
                )
            except StrataError as err:
                log.warning("cache lookup failed (%s); treating it as a miss", err.reason)
                span.set_attributes({semconv.CACHE_RESULT: "error", semconv.ERROR_TYPE: err.reason})
                return None, common_pb2.CACHE_STATUS_ERROR
            result = _match_names.get(found.match, "miss")
            span.set_attribute(semconv.CACHE_RESULT, result)
            if found.similarity:
                span.set_attribute(semconv.CACHE_SIMILARITY, found.similarity)
            if found.rejected_by:
                span.set_attribute(semconv.CACHE_REJECTED_BY, found.rejected_by)
        if found.match == common_pb2.CACHE_MATCH_UNSPECIFIED:
            return found, common_pb2.CACHE_STATUS_MISS
        return found, common_pb2.CACHE_STATUS_HIT

    async def _run_plan(self, call: _Call, tally: _Tally) -> AsyncGenerator[Event, None]:
        """Tries the plan's candidates in order until one answers."""
        plan = [c.model for c in call.admission.plan] or [call.prepared.model]
        for index, model in enumerate(plan):
            started = tally.attempt_began = time.monotonic()
            attempt = control_pb2.Attempt(model=model)
            try:
                answer = (
                    self._stream(call, model, tally)
                    if call.stream
                    else self._whole(call, model, tally)
                )
                async with aclosing(answer) as events:
                    async for event in events:
                        yield event
                attempt.success = True
                if tally.usage is not None:
                    attempt.usage.CopyFrom(tally.usage)
                return
            except StrataError as err:
                attempt.error_reason = err.reason
                last = index == len(plan) - 1
                if tally.accepted or last or err.reason not in FALLBACK_REASONS:
                    raise
                call.deadline.remaining()  # no time left: DEADLINE_EXCEEDED, not a fallback
                log.warning(
                    "model %s failed (%s); falling back to %s", model, err.reason, plan[index + 1]
                )
                trace.get_current_span().add_event(
                    semconv.FALLBACK,
                    {semconv.MODEL: model, semconv.ERROR_TYPE: err.reason, "to": plan[index + 1]},
                )
                telemetry.instruments(_SERVICE).fallbacks.add(
                    1, {semconv.MODEL: model, semconv.REASON: err.reason}
                )
            finally:
                elapsed = time.monotonic() - started
                attempt.latency.CopyFrom(_duration(elapsed))
                tally.attempts.append(attempt)
                if attempt.success:
                    self._latencies.observe(model, elapsed)

    async def _stream(self, call: _Call, model: str, tally: _Tally) -> AsyncGenerator[Event, None]:
        """One candidate's streamed answer, watched by the output guardrails."""
        profile = call.admission.guardrail_profile or None
        scanner = self._guardrails.output_scanner(profile)
        chunks = self._executor.stream(
            executor_pb2.StreamCompleteRequest(
                request_id=call.request_id,
                model=model,
                messages=call.messages,
                params=call.request.params,
            ),
            call.deadline,
        )
        async with aclosing(chunks) as executor_chunks:
            async for chunk in executor_chunks:
                kind = chunk.WhichOneof("chunk")
                if kind == "delta":
                    delta = chunk.delta
                    if delta.text:
                        if (attempt := len(tally.attempts)) not in tally.first_token_s:
                            tally.first_token_s[attempt] = time.monotonic() - tally.attempt_began
                        if blocking := scanner.feed(delta.text):
                            tally.findings.append(_finding(blocking.rule, blocking.action))
                            raise GuardrailBlocked(blocking.rule, "output")
                        tally.text.append(delta.text)
                        tally.output_bytes += len(delta.text.encode())
                        yield delta.text
                    if delta.tool_calls:
                        tally.tool_pieces.extend(delta.tool_calls)
                        tally.output_bytes += sum(len(p.arguments_json) for p in delta.tool_calls)
                        yield ToolPieces(delta.tool_calls)
                elif kind == "start":
                    tally.accepted = True
                    tally.model = chunk.start.model
                    yield Started(
                        call.request_id,
                        chunk.start.model,
                        tally.cache_status,
                        prompt=call.prepared.prompt,
                    )
                elif kind == "final":
                    final = chunk.final
                    tally.usage, tally.cost = final.usage, final.cost
                    tally.finish_reason = final.finish_reason
                    # Rules that only flag or redact leave the (already sent) stream alone.
                    verdict = await self._guardrails.acheck_output("".join(tally.text), profile)
                    tally.findings += [_finding(f.rule, f.action) for f in verdict.findings]
                    _guardrail_event(verdict)
                    yield Finished(
                        final.finish_reason,
                        final.usage,
                        final.cost,
                        tally.cache_status,
                        call.prepared.citations,
                        call.prepared.retrieval_degraded,
                    )
                    return
        raise StreamInterrupted("the executor's stream ended before its final chunk")

    async def _whole(self, call: _Call, model: str, tally: _Tally) -> AsyncGenerator[Event, None]:
        """One candidate's whole answer, checked by the output guardrails before it is sent."""
        answer = await self._executor.complete(
            executor_pb2.CompleteRequest(
                request_id=call.request_id,
                model=model,
                messages=call.messages,
                params=call.request.params,
            ),
            call.deadline,
        )
        tally.accepted = True
        tally.model = answer.model
        tally.usage, tally.cost = answer.usage, answer.cost
        tally.finish_reason = answer.finish_reason
        verdict = await self._guardrails.acheck_output(
            answer.text, call.admission.guardrail_profile or None
        )
        tally.findings += [_finding(f.rule, f.action) for f in verdict.findings]
        _guardrail_event(verdict)
        if (blocking := verdict.blocking) is not None:
            raise GuardrailBlocked(blocking.rule, "output")
        text = _redacted_output(verdict, answer.text)
        tally.text.append(text)
        tally.tool_pieces = tool_call_pieces(answer.tool_calls)
        prompt = call.prepared.prompt
        yield Started(call.request_id, answer.model, tally.cache_status, prompt=prompt)
        yield text
        if tally.tool_pieces:
            yield ToolPieces(tally.tool_pieces)
        yield Finished(
            answer.finish_reason,
            answer.usage,
            answer.cost,
            tally.cache_status,
            call.prepared.citations,
            call.prepared.retrieval_degraded,
        )

    async def _store(self, call: _Call, tally: _Tally, at_once: bool = False) -> None:
        if tally.finish_reason not in _STORABLE or tally.usage is None:
            return
        store = cache_pb2.StoreRequest(
            scope=_scope(call.admission.tenant_id, tally.model, call.prepared),
            messages=call.messages,
            answer=cache_pb2.CachedAnswer(
                text="".join(tally.text),
                finish_reason=tally.finish_reason,
                usage=tally.usage,
                request_id=call.request_id,
                tool_calls=assemble_tool_calls(tally.tool_pieces),
            ),
        )
        if call.prepared.ttl is not None:
            store.ttl.CopyFrom(call.prepared.ttl)
        try:
            with _span(semconv.SPAN_CACHE_STORE):
                await self._cache.store(store, at_once)
        except StrataError as err:
            log.warning("cache store failed (%s)", err.reason)

    async def _settle(self, call: _Call, tally: _Tally) -> None:
        usage, cost = tally.usage, tally.cost
        config = call.prepared.config
        if usage is None:
            # No final chunk: charge what the provider has likely billed so far.
            usage = common_pb2.Usage(
                input_tokens=call.prepared.estimated_input if tally.accepted else 0,
                output_tokens=math.ceil(tally.output_bytes / 4),
                estimated=True,
            )
            cost = (self._catalog.get(tally.model) or config).cost(usage)
        admission = call.admission
        call.clock.lap(
            "cache_hit" if tally.cache_status == common_pb2.CACHE_STATUS_HIT else "model"
        )
        span = _span(
            semconv.SPAN_SETTLEMENT,
            {
                semconv.COST_USD_MICROS: cost.total_usd_micros if cost else 0,
                semconv.OUTCOME: control_pb2.Outcome.Name(tally.outcome),
            },
        )
        try:
            with span:
                await self._control.settle(
                    control_pb2.SettleRequest(
                        request_id=call.request_id,
                        tenant_id=admission.tenant_id,
                        key_id=admission.key_id,
                        team_id=admission.team_id,
                        outcome=tally.outcome,
                        model=tally.model,
                        usage=usage,
                        cost=cost,
                        cache_status=tally.cache_status,
                        attempts=tally.attempts,
                        guardrail_findings=tally.findings,
                        admission=admission.admission,
                    )
                )
        except StrataError as err:
            log.error("settlement refused (%s); the reservation will expire instead", err.reason)
        call.clock.lap("settlement")
        self._account(call, tally, usage, cost)
        if self._records is not None:
            # Built and saved after the reply: none of it is on the request's path.
            self._background.run(self._save_record(call, tally, usage, cost))

    async def _save_record(
        self,
        call: _Call,
        tally: _Tally,
        usage: common_pb2.Usage,
        cost: common_pb2.Cost | None,
    ) -> None:
        assert self._records is not None
        await self._records.save(self._record(call, tally, usage, cost))

    def _account(
        self,
        call: _Call,
        tally: _Tally,
        usage: common_pb2.Usage,
        cost: common_pb2.Cost | None,
    ) -> None:
        """The request's metrics."""
        made = telemetry.instruments(_SERVICE)
        tenant = call.admission.tenant_id
        model = tally.model or call.prepared.model
        made.requests.add(1, {semconv.OUTCOME: tally.error or "OK", semconv.MODEL: model})
        result = _cache_result(tally.cache_status, tally.cache_match)
        made.cache_results.add(1, {semconv.CACHE_RESULT: result, semconv.MODEL: model})
        if cost is not None and cost.total_usd_micros:
            made.cost.add(
                cost.total_usd_micros / 1e6, {semconv.TENANT_ID: tenant, semconv.MODEL: model}
            )

    def _record(
        self,
        call: _Call,
        tally: _Tally,
        usage: common_pb2.Usage,
        cost: common_pb2.Cost | None,
    ) -> traces_pb2.RequestRecord:
        """What happened to the request, for GetTrace and replay."""
        prepared, clock = call.prepared, call.clock
        request = orchestrator_pb2.GenerateRequest()
        request.ParseFromString(prepared.request.SerializeToString())
        # As it ran: templates rendered, documents retrieved, redactions applied.
        request.ClearField("template")
        request.ClearField("retrieval")
        request.ClearField("route")
        request.model = prepared.model
        del request.messages[:]
        request.messages.extend(call.messages)
        record = traces_pb2.RequestRecord(
            request_id=call.request_id,
            tenant_id=call.admission.tenant_id,
            trace_id=clock.trace_id,
            create_time=clock.create_time,
            model=prepared.model,
            prompt=prepared.prompt,
            request=request,
            cache_status=tally.cache_status,
            sources=prepared.citations,
            outcome=tally.error or "OK",
            finish_reason=tally.finish_reason,
            usage=usage,
            stages=[
                traces_pb2.StageTiming(stage=name, duration=_duration(seconds))
                for name, seconds in clock.stages
            ],
            latency=_duration(time.monotonic() - clock.begun),
        )
        if tally.cache_match:
            record.cache.match = tally.cache_match
            record.cache.similarity = tally.cache_similarity
        if cost is not None:
            record.cost.CopyFrom(cost)
        for index, attempt in enumerate(tally.attempts):
            kept = record.attempts.add(
                model=attempt.model,
                outcome=attempt.error_reason or ("OK" if attempt.success else "CANCELLED"),
                latency=attempt.latency,
                usage=attempt.usage,
            )
            if index in tally.first_token_s:
                kept.time_to_first_token.CopyFrom(_duration(tally.first_token_s[index]))
        made = telemetry.of(_SERVICE)
        if made.capture_content:
            record.output, record.output_truncated = telemetry.capture(
                "".join(tally.text), made.content_max_bytes
            )
        return record

    async def _audit(self, call: _Call, entry_id: str) -> None:
        """Asks the model anyway and lets the cache compare its answer with the served one."""
        try:
            answer = await self._executor.complete(
                executor_pb2.CompleteRequest(
                    request_id=call.request_id,
                    model=call.prepared.model,
                    messages=call.messages,
                    params=call.request.params,
                ),
                Deadline.after(AUDIT_DEADLINE_S),
            )
            await self._cache.audit(
                cache_pb2.AuditRequest(
                    tenant_id=call.admission.tenant_id, entry_id=entry_id, answer_text=answer.text
                ),
                call.request_id,
            )
        except StrataError as err:
            log.info("cache audit skipped (%s)", err.reason)

    async def aclose(self) -> None:
        """Waits for background settlements, stores and records to finish, sending at once
        those that would wait for others to go with them."""
        self._control.flush_settlements(stop=True)
        self._cache.flush_stores(stop=True)
        if self._records is not None:
            self._records.flush(stop=True)
        await self._background.drain()


def usage_of_interruption(metadata: Mapping[str, str]) -> common_pb2.Usage | None:
    """The usage a STREAM_INTERRUPTED error from the executor carries, if any."""
    try:
        return common_pb2.Usage(
            input_tokens=int(metadata["input_tokens"]),
            output_tokens=int(metadata["output_tokens"]),
            estimated=metadata.get("usage_estimated") == "true",
        )
    except (KeyError, ValueError):
        return None


def _finding(rule: str, action: Action) -> control_pb2.GuardrailFinding:
    return control_pb2.GuardrailFinding(rule=rule, action=_ACTIONS[action], message_index=-1)


def _redacted_output(verdict: Verdict, text: str) -> str:
    return verdict.redacted[0] if verdict.redacted else text


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration


def _scope(tenant_id: str, model: str, prepared: Prepared) -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(
        tenant_id=tenant_id,
        model=model,
        params=prepared.request.params,
        documents=prepared.documents,
        semantic=prepared.semantic,
    )


# --- telemetry ------------------------------------------------------------------------------

_SERVICE = "orchestrator"
_match_names = {
    common_pb2.CACHE_MATCH_EXACT: "exact",
    common_pb2.CACHE_MATCH_SEMANTIC: "semantic",
}


def _span(name: str, attributes: Mapping[str, Any] | None = None) -> Any:
    """A child span of the request's (ended when its block ends; failures marked)."""
    return telemetry.tracer(_SERVICE).start_as_current_span(name, attributes=attributes)


def _now() -> timestamp_pb2.Timestamp:
    now = timestamp_pb2.Timestamp()
    now.GetCurrentTime()
    return now


def _cache_result(status: common_pb2.CacheStatus, match: common_pb2.CacheMatch) -> str:
    if status == common_pb2.CACHE_STATUS_HIT:
        return _match_names.get(match, "exact")
    return common_pb2.CacheStatus.Name(status).removeprefix("CACHE_STATUS_").lower()


def _guardrail_event(verdict: Verdict) -> None:
    """The output guardrails' decision, on the request's span (only when a rule fired)."""
    if verdict.findings:
        trace.get_current_span().add_event(
            semconv.SPAN_GUARDRAILS,
            {
                semconv.GUARDRAIL_PHASE: "output",
                semconv.GUARDRAIL_BLOCKED: verdict.blocking is not None,
                semconv.GUARDRAIL_RULES: [f.rule for f in verdict.findings],
            },
        )
