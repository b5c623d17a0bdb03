"""Turning a generate request into what the model will see: route, retrieval, template.

    route (models, deadline, cost ceiling, cache and guardrail settings)
      → retrieval (chunks of the tenant's collection closest to the question)
      → template (rendered with the request's variables and the chunks as `documents`)
      → the conversation, checked (INVALID_ARGUMENT / NOT_FOUND before anything is spent)

Without a template, retrieved chunks reach the model as a system message listing them. The
route, template and a hash of the rendered conversation travel with the answer.

Retrieval is bounded by `retrieval_timeout_s` (and the request's deadline). When the
knowledge index fails or is too slow, the request's `retrieval.on_failure` (else the route's
`retrieval.on_failure`, else FAIL) decides: FAIL raises UNAVAILABLE with reason
RETRIEVAL_UNAVAILABLE (retryable); ANSWER_WITHOUT_CONTEXT goes on without documents, marks
the request `retrieval_degraded` (the final chunk says so) and keeps its answer out of the
cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from google.protobuf import duration_pb2

from services.common import semconv, telemetry
from services.common.calls import Deadline
from services.common.catalog import Catalog, ModelConfig
from services.common.errors import DependencyUnavailable, FieldViolation, RequestInvalid
from services.common.validation import (
    check_generation,
    check_map,
    check_messages,
    check_name,
    check_params,
    check_request_id,
    check_struct,
    estimate_input_tokens,
    is_duration_at_least,
    is_finite_between,
)
from services.orchestrator.knowledge import Chunk, KnowledgeStore
from services.orchestrator.routes import RouteDecision, Router
from services.orchestrator.templates import TemplateStore
from strata.cache.v1 import cache_pb2
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2

GenerateRequest = orchestrator_pb2.GenerateRequest | orchestrator_pb2.StreamGenerateRequest
TenantOf = Callable[[], Awaitable[str]]
"""Finds the caller's tenant (only called when the request needs it)."""

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 4
RETRIEVAL_TIMEOUT_S = 2.0
"""Longest a retrieval (embedding the question and searching the index) may take."""
_FAIL = orchestrator_pb2.RETRIEVAL_FAILURE_POLICY_FAIL
_WITHOUT_CONTEXT = orchestrator_pb2.RETRIEVAL_FAILURE_POLICY_ANSWER_WITHOUT_CONTEXT
_ROUTE_POLICIES = {"fail": _FAIL, "answer_without_context": _WITHOUT_CONTEXT}
MAX_TOP_K = 50
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


@dataclass(slots=True)
class Prepared:
    """A request ready for admission."""

    request_id: str
    request: GenerateRequest
    model: str
    """The preferred model alias (the request's, or the route's first candidate)."""
    config: ModelConfig
    max_output: int
    messages: list[common_pb2.ChatMessage]
    estimated_input: int
    deadline: Deadline
    candidates: list[str]
    """The route's candidates in order; empty: the model and its configured fallbacks."""
    max_cost_usd_micros: int | None
    guardrail_profile: str
    reads: bool
    writes: bool
    semantic: cache_pb2.SemanticPolicy
    ttl: duration_pb2.Duration | None
    prompt: orchestrator_pb2.PromptInfo
    chunks: list[Chunk] = field(default_factory=list)
    retrieval_degraded: bool = False
    """Retrieval failed and the request goes on without documents (policy
    ANSWER_WITHOUT_CONTEXT)."""

    @property
    def documents(self) -> list[cache_pb2.DocumentRef]:
        """The retrieved documents with their versions (part of the cache scope)."""
        seen = {(c.document_id, c.version) for c in self.chunks}
        return [cache_pb2.DocumentRef(id=i, version=v) for i, v in sorted(seen)]

    @property
    def citations(self) -> list[orchestrator_pb2.Citation]:
        """The chunks as citations, best first."""
        return [
            orchestrator_pb2.Citation(
                document_id=c.document_id, version=c.version, chunk=c.chunk, score=c.score
            )
            for c in self.chunks
        ]


def prompt_hash(messages: Sequence[common_pb2.ChatMessage]) -> str:
    """SHA-256 of a conversation (roles and contents)."""
    digest = hashlib.sha256()
    for message in messages:
        digest.update(f"{message.role}\x00{message.content}\x00".encode())
    return digest.hexdigest()


def _chunk_dict(chunk: Chunk) -> dict[str, object]:
    return {
        "text": chunk.text,
        "document_id": chunk.document_id,
        "version": chunk.version,
        "chunk": chunk.chunk,
        "score": chunk.score,
        "metadata": dict(chunk.metadata),
    }


def documents_message(chunks: Sequence[Chunk]) -> common_pb2.ChatMessage:
    """The retrieved chunks as a system message, for requests without a template."""
    listed = "\n\n".join(
        f"[{i}] ({c.document_id} v{c.version})\n{c.text}" for i, c in enumerate(chunks, 1)
    )
    return common_pb2.ChatMessage(
        role=common_pb2.ROLE_SYSTEM,
        content="Answer from these documents; cite them by number.\n\n" + listed,
    )


class Preparer:
    """Builds the conversation and the request's settings."""

    def __init__(
        self,
        catalog: Catalog,
        router: Router,
        templates: TemplateStore,
        knowledge: KnowledgeStore | None,
        retrieval_timeout_s: float = RETRIEVAL_TIMEOUT_S,
    ) -> None:
        self._catalog = catalog
        self._router = router
        self._templates = templates
        self._knowledge = knowledge
        self._retrieval_timeout_s = retrieval_timeout_s

    async def prepare(
        self,
        request: GenerateRequest,
        deadline: Deadline,
        tenant_of: TenantOf,
        tier_of: TenantOf | None = None,
    ) -> Prepared:
        """The request as the model will see it; INVALID_ARGUMENT or NOT_FOUND when it is bad.
        `tier_of` finds the tenant's tier, asked only for routes whose rules match on it."""
        check_shape(request)
        tier = ""
        if request.route and tier_of is not None and self._router.uses_tier(request.route):
            tier = await tier_of()
        route = self._route(request, tier)
        if route is not None and route.deadline_s is not None:
            budget = Deadline.after(route.deadline_s)
            deadline = Deadline(min(deadline.expires_at, budget.expires_at))
        model = route.candidates[0] if route is not None else request.model

        retrieval = _retrieval(request, route)
        chunks: list[Chunk] = []
        degraded = False
        if retrieval is not None:
            try:
                chunks = await self._retrieve(request, retrieval, await tenant_of(), deadline)
            except RetrievalFailed as err:
                if _on_failure(request, route) != _WITHOUT_CONTEXT:
                    raise DependencyUnavailable("retrieval") from err
                log.warning("retrieval failed (%s); answering without context", err)
                degraded = True
        messages = list(request.messages)
        template = ""
        if request.HasField("template"):
            rendered = await self._templates.render(
                request.template, {"documents": [_chunk_dict(c) for c in chunks]}
            )
            messages = [*rendered.messages, *messages]
            template = f"{rendered.name}@{rendered.version}"
        elif chunks:
            messages = [documents_message(chunks), *messages]
        estimated_input = estimate_input_tokens(messages)
        if route is not None and (template or chunks):
            # Size rules and prices go by the conversation the model will see.
            route = self._router.reorder(route, estimated_input, dict(request.tags), tier)
            model = route.candidates[0]

        config, max_output = check_generation(self._catalog, model, messages, request.params)
        if estimated_input + max_output > config.context_window:
            raise RequestInvalid.field(
                "messages",
                f"about {estimated_input} prompt tokens plus {max_output} output tokens exceed "
                f"the {config.context_window}-token context window of {config.name!r}",
                reason="PROMPT_TOO_LARGE",
            )
        mode = request.cache_policy.mode
        semantic = cache_pb2.SemanticPolicy(disabled=request.cache_policy.semantic_disabled)
        ttl = request.cache_policy.ttl if request.cache_policy.HasField("ttl") else None
        max_cost = request.max_cost_usd_micros if request.HasField("max_cost_usd_micros") else None
        profile = ""
        if route is not None:
            cache = route.config.cache
            if cache is not None:
                temperature = (
                    request.params.temperature if request.params.HasField("temperature") else None
                )
                semantic.disabled = semantic.disabled or not cache.semantic_allowed(temperature)
                semantic.min_similarity = cache.min_similarity or 0.0
                # The route's own temperature bound replaces the cache service's default.
                semantic.allow_high_temperature = not semantic.disabled
                if ttl is None and cache.ttl_s:
                    ttl = duration_pb2.Duration(seconds=int(cache.ttl_s))
            profile = route.config.guardrail_profile or ""
            max_cost = route.cost_ceiling(max_cost)
        return Prepared(
            request_id=request.request_id or uuid.uuid4().hex,
            request=request,
            model=model,
            config=config,
            max_output=max_output,
            messages=messages,
            estimated_input=estimated_input,
            deadline=deadline,
            candidates=list(route.candidates) if route is not None else [],
            max_cost_usd_micros=max_cost,
            guardrail_profile=profile,
            reads=mode in _READS,
            # An answer made without its documents is not kept for later requests.
            writes=mode in _WRITES and not degraded,
            semantic=semantic,
            ttl=ttl,
            prompt=orchestrator_pb2.PromptInfo(
                route=request.route, template=template, prompt_hash=prompt_hash(messages)
            ),
            chunks=chunks,
            retrieval_degraded=degraded,
        )

    def _route(self, request: GenerateRequest, tier: str) -> RouteDecision | None:
        if not request.route:
            return None
        prompt_tokens = estimate_input_tokens(request.messages)
        return self._router.decide(request.route, prompt_tokens, dict(request.tags), tier)

    async def _retrieve(
        self,
        request: GenerateRequest,
        retrieval: orchestrator_pb2.RetrievalSettings,
        tenant_id: str,
        deadline: Deadline,
    ) -> list[Chunk]:
        """The chunks for the request; RetrievalFailed when the index fails or is too slow
        (RequestInvalid for a bad request, whatever the policy)."""
        if self._knowledge is None:
            raise RequestInvalid.field("retrieval", "retrieval is not configured on this server")
        query = next(
            (m.content for m in reversed(request.messages) if m.role == common_pb2.ROLE_USER),
            "",
        )
        if not query and request.HasField("template"):
            # A templated request may carry its question as a variable.
            query = str(dict(request.template.variables.items()).get("question", ""))
        if not query:
            raise RequestInvalid.field("retrieval", "needs a user message (or a `question`)")
        max_age = retrieval.max_age.ToSeconds() if retrieval.HasField("max_age") else None
        with telemetry.tracer("orchestrator").start_as_current_span(
            semconv.SPAN_RETRIEVAL, attributes={semconv.RETRIEVAL_COLLECTION: retrieval.collection}
        ) as span:
            try:
                async with asyncio.timeout(deadline.cap(self._retrieval_timeout_s)):
                    chunks = await self._knowledge.search(
                        tenant_id,
                        retrieval.collection,
                        query,
                        top_k=retrieval.top_k or DEFAULT_TOP_K,
                        min_score=retrieval.min_score,
                        max_age_s=float(max_age) if max_age else None,
                        metadata_filter=dict(retrieval.metadata_filter),
                    )
            except TimeoutError as err:
                span.set_attribute(semconv.ERROR_TYPE, "timeout")
                raise RetrievalFailed("timeout") from err
            except (DependencyUnavailable, OSError) as err:
                reason = err.reason if isinstance(err, DependencyUnavailable) else "os_error"
                span.set_attribute(semconv.ERROR_TYPE, reason)
                raise RetrievalFailed(reason) from err
            span.set_attributes(
                {
                    semconv.RETRIEVAL_DOCUMENTS: [f"{c.document_id}@{c.version}" for c in chunks],
                    semconv.RETRIEVAL_SCORES: [round(c.score, 4) for c in chunks],
                }
            )
            return chunks


class RetrievalFailed(Exception):
    """The knowledge index failed or did not answer in time (the message says which)."""


def _on_failure(
    request: GenerateRequest, route: RouteDecision | None
) -> orchestrator_pb2.RetrievalFailurePolicy:
    """The request's retrieval failure policy, else the route's, else FAIL."""
    if request.HasField("retrieval") and request.retrieval.on_failure:
        return request.retrieval.on_failure
    defaults = route.config.retrieval if route is not None else None
    return _ROUTE_POLICIES[defaults.on_failure] if defaults is not None else _FAIL


def _retrieval(
    request: GenerateRequest, route: RouteDecision | None
) -> orchestrator_pb2.RetrievalSettings | None:
    if request.HasField("retrieval"):
        return request.retrieval
    defaults = route.config.retrieval if route is not None else None
    if defaults is None:
        return None
    return orchestrator_pb2.RetrievalSettings(
        collection=defaults.collection, top_k=defaults.top_k, min_score=defaults.min_score
    )


def check_shape(request: GenerateRequest, prefix: str = "") -> None:
    """INVALID_ARGUMENT for everything about a request that needs no route, template or
    model to judge; run before anything is claimed, reserved or stored. `prefix` names the
    request inside another (a job's `generate.`)."""
    violations = []
    if request.request_id and (violation := check_request_id(request.request_id)):
        violations.append(violation)
    if request.route and request.model:
        violations.append(FieldViolation("route", "name a model or a route, not both"))
    if not request.route and not request.model:
        violations.append(FieldViolation("model", "is required (or a route)"))
    for name in ("model", "route"):
        if violation := check_name(getattr(request, name), name, required=False):
            violations.append(violation)
    if request.priority not in common_pb2.Priority.values():
        violations.append(FieldViolation("priority", "must be a known priority"))
    if request.HasField("max_cost_usd_micros") and request.max_cost_usd_micros <= 0:
        violations.append(FieldViolation("max_cost_usd_micros", "must be greater than 0"))
    if request.HasField("retrieval"):
        violations.extend(_check_retrieval(request.retrieval))
    if request.HasField("template"):
        violations.extend(_check_template(request.template))
    if not request.messages and not request.HasField("template"):
        violations.append(FieldViolation("messages", "at least one message is required"))
    violations.extend(check_messages(request.messages))
    violations.extend(check_params(request.params))
    violations.extend(_check_cache_policy(request.cache_policy))
    violations.extend(check_map(request.tags, "tags"))
    if violations:
        raise RequestInvalid(
            [FieldViolation(prefix + v.field, v.description) for v in violations]
            if prefix
            else violations
        )


def _check_retrieval(retrieval: orchestrator_pb2.RetrievalSettings) -> list[FieldViolation]:
    violations = []
    if violation := check_name(retrieval.collection, "retrieval.collection"):
        violations.append(violation)
    if not 0 <= retrieval.top_k <= MAX_TOP_K:
        violations.append(FieldViolation("retrieval.top_k", f"1 to {MAX_TOP_K}"))
    if not is_finite_between(retrieval.min_score, 0, 1):
        violations.append(FieldViolation("retrieval.min_score", "0 to 1"))
    if retrieval.HasField("max_age") and not is_duration_at_least(retrieval.max_age, minimum_ns=0):
        violations.append(FieldViolation("retrieval.max_age", "must not be negative"))
    violations.extend(check_map(retrieval.metadata_filter, "retrieval.metadata_filter"))
    if retrieval.on_failure not in orchestrator_pb2.RetrievalFailurePolicy.values():
        violations.append(FieldViolation("retrieval.on_failure", "must be a known policy"))
    return violations


def _check_template(template: orchestrator_pb2.TemplateRef) -> list[FieldViolation]:
    violations = [
        v
        for v in (
            check_name(template.name, "template.name"),
            check_name(template.version, "template.version", required=False),
        )
        if v
    ]
    violations.extend(check_struct(template.variables, "template.variables"))
    return violations


def _check_cache_policy(policy: common_pb2.CachePolicy) -> list[FieldViolation]:
    violations = []
    if policy.mode not in common_pb2.CacheMode.values():
        violations.append(FieldViolation("cache_policy.mode", "must be a known mode"))
    if policy.HasField("ttl") and not is_duration_at_least(policy.ttl, minimum_ns=1_000_000_000):
        violations.append(FieldViolation("cache_policy.ttl", "must be at least one second"))
    return violations
