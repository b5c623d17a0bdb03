"""One generate request, from validation to settlement.

    validate ──► Admit (control) ─┬─► hit:  replay the cached answer
                 Lookup (cache) ──┘   miss: walk the plan: StreamComplete (executor) per
                                            candidate until one answers ──► Store, Settle

Admission and the cache lookup run side by side: the lookup's scope needs the tenant, so it
uses the tenant this process last saw for the key and is thrown away (and done again) when
Admit names another tenant or redacts the conversation. A hit is served only after Admit.

The plan is control's ordered list of candidate models. A candidate that fails before its
answer starts, for a reason another model may not share (unavailable, rate limited, out of
quota, too small a context...), hands over to the next one while the deadline allows; once
an answer has started, a failure ends the stream. Output guardrails watch a streamed answer
as it goes and cut it with GUARDRAIL_BLOCKED; a whole answer is checked before it is sent.

When a call completes, its answer is stored and its usage settled (with every attempt, for
the circuit breakers) before the stream ends; the final chunk itself is not held back. A
failed or cancelled call is settled in the background with what it used as far as known.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from google.protobuf import duration_pb2

from services.common.calls import Deadline
from services.common.catalog import Catalog, ModelConfig
from services.common.chat import assemble_tool_calls, tool_call_pieces
from services.common.errors import (
    FieldViolation,
    GuardrailBlocked,
    RequestInvalid,
    StrataError,
    StreamInterrupted,
)
from services.common.guardrails import Action, Guardrails, Verdict
from services.common.logs import bind_request_id
from services.common.validation import check_generation, check_request_id, estimate_input_tokens
from services.orchestrator.clients import CacheClient, ControlClient, ExecutorClient
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2
from strata.executor.v1 import executor_pb2
from strata.orchestrator.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

GenerateRequest = orchestrator_pb2.GenerateRequest | orchestrator_pb2.StreamGenerateRequest

AUDIT_DEADLINE_S = 120.0
REPLAY_CHUNK_CHARS = 64
"""A cached answer streams back in pieces of this many characters, like a live one."""
TENANT_MEMO_SIZE = 10_000

_READS = {
    common_pb2.CACHE_MODE_UNSPECIFIED,
    common_pb2.CACHE_MODE_READ_WRITE,
    common_pb2.CACHE_MODE_READ_ONLY,
}
_WRITES = {
    common_pb2.CACHE_MODE_UNSPECIFIED,
    common_pb2.CACHE_MODE_READ_WRITE,
    common_pb2.CACHE_MODE_WRITE_ONLY,
}
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


Event = Started | str | ToolPieces | Finished
"""A generation streams Started, then text pieces (str) and ToolPieces, then Finished."""


@dataclass(slots=True)
class _Call:
    """What every step of one request needs."""

    request_id: str
    request: GenerateRequest
    messages: Sequence[common_pb2.ChatMessage]
    """The conversation as the model sees it (redacted by the input guardrails if need be)."""
    admission: control_pb2.AdmitResponse
    deadline: Deadline
    stream: bool


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


class Generator:
    """Runs generate requests across control, cache and executor."""

    def __init__(
        self,
        catalog: Catalog,
        guardrails: Guardrails,
        control: ControlClient,
        cache: CacheClient,
        executor: ExecutorClient,
        audit_rate: float = 0.0,
    ) -> None:
        self._catalog = catalog
        self._audit_rate = audit_rate
        self._guardrails = guardrails
        self._control = control
        self._cache = cache
        self._executor = executor
        self._tenant_of_key: dict[bytes, str] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def generate(
        self, request: GenerateRequest, api_key: str, deadline: Deadline, *, stream: bool
    ) -> AsyncGenerator[Event, None]:
        """Events of one request; raises StrataError with the reason when it fails."""
        config, max_output = check_generation(
            self._catalog, request.model, request.messages, request.params
        )
        violations = []
        if request.request_id and (violation := check_request_id(request.request_id)):
            violations.append(violation)
        if request.priority not in common_pb2.Priority.values():
            violations.append(FieldViolation("priority", "must be a known priority"))
        if request.HasField("max_cost_usd_micros") and request.max_cost_usd_micros <= 0:
            violations.append(FieldViolation("max_cost_usd_micros", "must be greater than 0"))
        if violations:
            raise RequestInvalid(violations)
        estimated_input = estimate_input_tokens(request.messages)
        if estimated_input + max_output > config.context_window:
            raise RequestInvalid.field(
                "messages",
                f"about {estimated_input} prompt tokens plus {max_output} output tokens exceed "
                f"the {config.context_window}-token context window of {config.name!r}",
                reason="PROMPT_TOO_LARGE",
            )
        request_id = request.request_id or uuid.uuid4().hex
        bind_request_id(request_id)
        mode = request.cache_policy.mode
        reads, writes = mode in _READS, mode in _WRITES

        call, found, cache_status = await self._admit_and_lookup(
            request, request_id, api_key, estimated_input, max_output, deadline, reads, stream
        )
        cached = found.answer if found is not None else None
        tally = _Tally(cache_status=cache_status)
        try:
            if found is not None and cached is not None:
                tally.model = config.name
                tally.usage, tally.cost = common_pb2.Usage(), common_pb2.Cost()
                yield Started(request_id, config.name, cache_status, found.match)
                for i in range(0, len(cached.text), REPLAY_CHUNK_CHARS):
                    yield cached.text[i : i + REPLAY_CHUNK_CHARS]
                if cached.tool_calls:
                    yield ToolPieces(tool_call_pieces(cached.tool_calls))
                yield Finished(cached.finish_reason, cached.usage, common_pb2.Cost(), cache_status)
            else:
                async with aclosing(self._run_plan(call, tally)) as events:
                    async for event in events:
                        yield event
            tally.outcome = control_pb2.OUTCOME_SUCCESS
        except (asyncio.CancelledError, GeneratorExit):
            tally.outcome = control_pb2.OUTCOME_CANCELLED
            self._in_background(self._settle(call, tally, config, estimated_input))
            raise
        except Exception as err:
            if isinstance(err, StrataError) and err.reason == "STREAM_INTERRUPTED":
                # The executor counted what the broken stream used; charge that.
                tally.usage = usage_of_interruption(err.metadata)
                model = self._catalog.get(tally.model) or config
                tally.cost = model.cost(tally.usage) if tally.usage else None
            self._in_background(self._settle(call, tally, config, estimated_input))
            raise
        finishing = [self._settle(call, tally, config, estimated_input)]
        if writes and cached is None:
            finishing.append(self._store(call, tally))
        await asyncio.gather(*finishing)
        semantic = found is not None and found.match == common_pb2.CACHE_MATCH_SEMANTIC
        if semantic and self._audit_rate and random.random() < self._audit_rate:
            assert found is not None
            self._in_background(self._audit(call, found.entry_id))

    async def _admit_and_lookup(
        self,
        request: GenerateRequest,
        request_id: str,
        api_key: str,
        estimated_input: int,
        max_output: int,
        deadline: Deadline,
        reads: bool,
        stream: bool,
    ) -> tuple[_Call, cache_pb2.LookupResponse | None, common_pb2.CacheStatus]:
        fingerprint = hashlib.sha256(api_key.encode()).digest()
        predicted = self._tenant_of_key.get(fingerprint) if reads else None
        early = (
            asyncio.create_task(
                self._lookup(request, request.messages, predicted, request_id, deadline)
            )
            if predicted
            else None
        )
        admit = control_pb2.AdmitRequest(
            request_id=request_id,
            api_key=api_key,
            model=request.model,
            estimated_input_tokens=estimated_input,
            max_output_tokens=max_output,
            priority=request.priority,
            messages=request.messages,
        )
        if request.HasField("max_cost_usd_micros"):
            admit.max_cost_usd_micros = request.max_cost_usd_micros
        try:
            admission = await self._control.admit(admit, deadline)
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        if len(self._tenant_of_key) >= TENANT_MEMO_SIZE:
            self._tenant_of_key.clear()
        self._tenant_of_key[fingerprint] = admission.tenant_id
        messages = admission.redacted_messages or request.messages
        call = _Call(request_id, request, messages, admission, deadline, stream)
        if not reads:
            return call, None, common_pb2.CACHE_STATUS_BYPASS
        if early is None or predicted != admission.tenant_id or admission.redacted_messages:
            if early is not None:
                early.cancel()
            early = asyncio.create_task(
                self._lookup(request, messages, admission.tenant_id, request_id, deadline)
            )
        answer, status = await early
        return call, answer, status

    async def _lookup(
        self,
        request: GenerateRequest,
        messages: Sequence[common_pb2.ChatMessage],
        tenant_id: str,
        request_id: str,
        deadline: Deadline,
    ) -> tuple[cache_pb2.LookupResponse | None, common_pb2.CacheStatus]:
        """The cache's answer and the cache status; a failing cache counts as a miss."""
        try:
            found = await self._cache.lookup(
                cache_pb2.LookupRequest(
                    scope=_scope(tenant_id, request.model, request), messages=messages
                ),
                deadline,
                request_id,
            )
        except StrataError as err:
            log.warning("cache lookup failed (%s); treating it as a miss", err.reason)
            return None, common_pb2.CACHE_STATUS_ERROR
        if found.match == common_pb2.CACHE_MATCH_UNSPECIFIED:
            return None, common_pb2.CACHE_STATUS_MISS
        return found, common_pb2.CACHE_STATUS_HIT

    async def _run_plan(self, call: _Call, tally: _Tally) -> AsyncGenerator[Event, None]:
        """Tries the plan's candidates in order until one answers."""
        plan = [c.model for c in call.admission.plan] or [call.request.model]
        for index, model in enumerate(plan):
            started = time.monotonic()
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
            finally:
                attempt.latency.CopyFrom(_duration(time.monotonic() - started))
                tally.attempts.append(attempt)

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
                    yield Started(call.request_id, chunk.start.model, tally.cache_status)
                elif kind == "final":
                    final = chunk.final
                    tally.usage, tally.cost = final.usage, final.cost
                    tally.finish_reason = final.finish_reason
                    # Rules that only flag or redact leave the (already sent) stream alone.
                    verdict = self._guardrails.check_output("".join(tally.text), profile)
                    tally.findings += [_finding(f.rule, f.action) for f in verdict.findings]
                    yield Finished(final.finish_reason, final.usage, final.cost, tally.cache_status)
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
        verdict = self._guardrails.check_output(
            answer.text, call.admission.guardrail_profile or None
        )
        tally.findings += [_finding(f.rule, f.action) for f in verdict.findings]
        if (blocking := verdict.blocking) is not None:
            raise GuardrailBlocked(blocking.rule, "output")
        text = _redacted_output(verdict, answer.text)
        tally.text.append(text)
        tally.tool_pieces = tool_call_pieces(answer.tool_calls)
        yield Started(call.request_id, answer.model, tally.cache_status)
        yield text
        if tally.tool_pieces:
            yield ToolPieces(tally.tool_pieces)
        yield Finished(answer.finish_reason, answer.usage, answer.cost, tally.cache_status)

    async def _store(self, call: _Call, tally: _Tally) -> None:
        if tally.finish_reason not in _STORABLE or tally.usage is None:
            return
        store = cache_pb2.StoreRequest(
            scope=_scope(call.admission.tenant_id, tally.model, call.request),
            messages=call.messages,
            answer=cache_pb2.CachedAnswer(
                text="".join(tally.text),
                finish_reason=tally.finish_reason,
                usage=tally.usage,
                request_id=call.request_id,
                tool_calls=assemble_tool_calls(tally.tool_pieces),
            ),
        )
        if call.request.cache_policy.HasField("ttl"):
            store.ttl.CopyFrom(call.request.cache_policy.ttl)
        try:
            await self._cache.store(store)
        except StrataError as err:
            log.warning("cache store failed (%s)", err.reason)

    async def _settle(
        self, call: _Call, tally: _Tally, config: ModelConfig, estimated_input: int
    ) -> None:
        usage, cost = tally.usage, tally.cost
        if usage is None:
            # No final chunk: charge what the provider has likely billed so far.
            usage = common_pb2.Usage(
                input_tokens=estimated_input if tally.accepted else 0,
                output_tokens=math.ceil(tally.output_bytes / 4),
                estimated=True,
            )
            cost = (self._catalog.get(tally.model) or config).cost(usage)
        admission = call.admission
        try:
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
                )
            )
        except StrataError as err:
            log.error("settlement failed (%s); the reservation will expire instead", err.reason)

    async def _audit(self, call: _Call, entry_id: str) -> None:
        """Asks the model anyway and lets the cache compare its answer with the served one."""
        try:
            answer = await self._executor.complete(
                executor_pb2.CompleteRequest(
                    request_id=call.request_id,
                    model=call.request.model,
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

    def _in_background(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        """Waits for background settlements to finish."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


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


def _scope(tenant_id: str, model: str, request: GenerateRequest) -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(
        tenant_id=tenant_id,
        model=model,
        params=request.params,
        semantic=cache_pb2.SemanticPolicy(disabled=request.cache_policy.semantic_disabled),
    )
