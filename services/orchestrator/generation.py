"""One generate request, from validation to settlement.

    validate ──► Admit (control) ─┬─► hit:  replay the cached answer
                 Lookup (cache) ──┘   miss: StreamComplete (executor) ──► Store, Settle

Admission and the cache lookup run side by side: the lookup's scope needs the tenant, so it
uses the tenant this process last saw for the key and is thrown away (and done again) when
Admit names another. A hit is served only after Admit succeeds.

When a call completes, its answer is stored and its usage settled before the stream ends
(the final chunk itself is not held back). A failed or cancelled call is settled in the
background with what it used as far as it is known.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import uuid
from collections.abc import AsyncGenerator, Awaitable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field

from services.common.calls import Deadline
from services.common.catalog import Catalog, ModelConfig
from services.common.chat import assemble_tool_calls, tool_call_pieces
from services.common.errors import RequestInvalid, StrataError, StreamInterrupted
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


@dataclass(frozen=True, slots=True)
class Started:
    """The first event: who answers and whether from the cache."""

    request_id: str
    model: str
    cache_status: common_pb2.CacheStatus


@dataclass(frozen=True, slots=True)
class Finished:
    """The last event of a complete answer."""

    finish_reason: common_pb2.FinishReason
    usage: common_pb2.Usage
    cost: common_pb2.Cost
    cache_status: common_pb2.CacheStatus


@dataclass(frozen=True, slots=True)
class ToolPieces:
    """Pieces of tool calls, in order."""

    pieces: Sequence[common_pb2.ToolCallDelta]


Event = Started | str | ToolPieces | Finished
"""A generation streams Started, then text pieces (str) and ToolPieces, then Finished."""


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


class Generator:
    """Runs generate requests across control, cache and executor."""

    def __init__(
        self,
        catalog: Catalog,
        control: ControlClient,
        cache: CacheClient,
        executor: ExecutorClient,
    ) -> None:
        self._catalog = catalog
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
        if request.request_id and (violation := check_request_id(request.request_id)):
            raise RequestInvalid([violation])
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

        admission, cached, cache_status = await self._admit_and_lookup(
            request, request_id, api_key, estimated_input, max_output, deadline, reads
        )
        tally = _Tally(cache_status=cache_status)
        try:
            if cached is not None:
                tally.model = config.name
                tally.usage, tally.cost = common_pb2.Usage(), common_pb2.Cost()
                yield Started(request_id, config.name, cache_status)
                for i in range(0, len(cached.text), REPLAY_CHUNK_CHARS):
                    yield cached.text[i : i + REPLAY_CHUNK_CHARS]
                if cached.tool_calls:
                    yield ToolPieces(tool_call_pieces(cached.tool_calls))
                yield Finished(cached.finish_reason, cached.usage, common_pb2.Cost(), cache_status)
                tally.outcome = control_pb2.OUTCOME_SUCCESS
            else:
                model = admission.plan[0].model if admission.plan else config.name
                calls = self._call_executor(request, request_id, model, deadline, tally, stream)
                async with aclosing(calls) as events:
                    async for event in events:
                        yield event
                tally.outcome = control_pb2.OUTCOME_SUCCESS
        except (asyncio.CancelledError, GeneratorExit):
            tally.outcome = control_pb2.OUTCOME_CANCELLED
            self._in_background(self._settle(request_id, admission, tally, config, estimated_input))
            raise
        except Exception as err:
            if isinstance(err, StrataError) and err.reason == "STREAM_INTERRUPTED":
                # The executor counted what the broken stream used; charge that.
                tally.usage = usage_of_interruption(err.metadata)
                tally.cost = config.cost(tally.usage) if tally.usage else None
            self._in_background(self._settle(request_id, admission, tally, config, estimated_input))
            raise
        finishing = [self._settle(request_id, admission, tally, config, estimated_input)]
        if writes and cached is None:
            finishing.append(self._store(request, request_id, admission.tenant_id, tally))
        await asyncio.gather(*finishing)

    async def _admit_and_lookup(
        self,
        request: GenerateRequest,
        request_id: str,
        api_key: str,
        estimated_input: int,
        max_output: int,
        deadline: Deadline,
        reads: bool,
    ) -> tuple[control_pb2.AdmitResponse, cache_pb2.CachedAnswer | None, common_pb2.CacheStatus]:
        fingerprint = hashlib.sha256(api_key.encode()).digest()
        predicted = self._tenant_of_key.get(fingerprint) if reads else None
        early = (
            asyncio.create_task(self._lookup(request, predicted, request_id, deadline))
            if predicted
            else None
        )
        try:
            admission = await self._control.admit(
                control_pb2.AdmitRequest(
                    request_id=request_id,
                    api_key=api_key,
                    model=request.model,
                    estimated_input_tokens=estimated_input,
                    max_output_tokens=max_output,
                ),
                deadline,
            )
        except BaseException:
            if early is not None:
                early.cancel()
            raise
        if len(self._tenant_of_key) >= TENANT_MEMO_SIZE:
            self._tenant_of_key.clear()
        self._tenant_of_key[fingerprint] = admission.tenant_id
        if not reads:
            return admission, None, common_pb2.CACHE_STATUS_BYPASS
        if early is None or predicted != admission.tenant_id:
            if early is not None:
                early.cancel()
            early = asyncio.create_task(
                self._lookup(request, admission.tenant_id, request_id, deadline)
            )
        answer, status = await early
        return admission, answer, status

    async def _lookup(
        self, request: GenerateRequest, tenant_id: str, request_id: str, deadline: Deadline
    ) -> tuple[cache_pb2.CachedAnswer | None, common_pb2.CacheStatus]:
        """The cached answer and the cache status; a failing cache counts as a miss."""
        try:
            found = await self._cache.lookup(
                cache_pb2.LookupRequest(
                    scope=_scope(tenant_id, request.model, request.params),
                    messages=request.messages,
                ),
                deadline,
                request_id,
            )
        except StrataError as err:
            log.warning("cache lookup failed (%s); treating it as a miss", err.reason)
            return None, common_pb2.CACHE_STATUS_ERROR
        if found.match == common_pb2.CACHE_MATCH_UNSPECIFIED:
            return None, common_pb2.CACHE_STATUS_MISS
        return found.answer, common_pb2.CACHE_STATUS_HIT

    async def _call_executor(
        self,
        request: GenerateRequest,
        request_id: str,
        model: str,
        deadline: Deadline,
        tally: _Tally,
        stream: bool,
    ) -> AsyncGenerator[Event, None]:
        if not stream:
            answer = await self._executor.complete(
                executor_pb2.CompleteRequest(
                    request_id=request_id,
                    model=model,
                    messages=request.messages,
                    params=request.params,
                ),
                deadline,
            )
            tally.accepted = True
            tally.model = answer.model
            tally.text.append(answer.text)
            tally.tool_pieces = tool_call_pieces(answer.tool_calls)
            tally.usage, tally.cost = answer.usage, answer.cost
            tally.finish_reason = answer.finish_reason
            yield Started(request_id, answer.model, tally.cache_status)
            yield answer.text
            if tally.tool_pieces:
                yield ToolPieces(tally.tool_pieces)
            yield Finished(answer.finish_reason, answer.usage, answer.cost, tally.cache_status)
            return

        chunks = self._executor.stream(
            executor_pb2.StreamCompleteRequest(
                request_id=request_id, model=model, messages=request.messages, params=request.params
            ),
            deadline,
        )
        async with aclosing(chunks) as executor_chunks:
            async for chunk in executor_chunks:
                kind = chunk.WhichOneof("chunk")
                if kind == "delta":
                    delta = chunk.delta
                    if delta.text:
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
                    yield Started(request_id, chunk.start.model, tally.cache_status)
                elif kind == "final":
                    final = chunk.final
                    tally.usage, tally.cost = final.usage, final.cost
                    tally.finish_reason = final.finish_reason
                    yield Finished(final.finish_reason, final.usage, final.cost, tally.cache_status)
                    return
        raise StreamInterrupted("the executor's stream ended before its final chunk")

    async def _store(
        self, request: GenerateRequest, request_id: str, tenant_id: str, tally: _Tally
    ) -> None:
        if tally.finish_reason not in _STORABLE or tally.usage is None:
            return
        store = cache_pb2.StoreRequest(
            scope=_scope(tenant_id, tally.model, request.params),
            messages=request.messages,
            answer=cache_pb2.CachedAnswer(
                text="".join(tally.text),
                finish_reason=tally.finish_reason,
                usage=tally.usage,
                request_id=request_id,
                tool_calls=assemble_tool_calls(tally.tool_pieces),
            ),
        )
        if request.cache_policy.HasField("ttl"):
            store.ttl.CopyFrom(request.cache_policy.ttl)
        try:
            await self._cache.store(store)
        except StrataError as err:
            log.warning("cache store failed (%s)", err.reason)

    async def _settle(
        self,
        request_id: str,
        admission: control_pb2.AdmitResponse,
        tally: _Tally,
        config: ModelConfig,
        estimated_input: int,
    ) -> None:
        usage, cost = tally.usage, tally.cost
        if usage is None:
            # No final chunk: charge what the provider has likely billed so far.
            usage = common_pb2.Usage(
                input_tokens=estimated_input if tally.accepted else 0,
                output_tokens=math.ceil(tally.output_bytes / 4),
            )
            cost = config.cost(usage)
        try:
            await self._control.settle(
                control_pb2.SettleRequest(
                    request_id=request_id,
                    tenant_id=admission.tenant_id,
                    key_id=admission.key_id,
                    outcome=tally.outcome,
                    model=tally.model,
                    usage=usage,
                    cost=cost,
                    cache_status=tally.cache_status,
                )
            )
        except StrataError as err:
            log.error("settlement failed (%s); the reservation will expire instead", err.reason)

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


def _scope(tenant_id: str, model: str, params: common_pb2.GenerationParams) -> cache_pb2.CacheScope:
    return cache_pb2.CacheScope(tenant_id=tenant_id, model=model, params=params)
