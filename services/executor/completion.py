"""The executor's domain: resolve a model alias to its provider and run the call.

Deadlines: the gRPC deadline bounds the call (the server cancels it when it passes), and
every attempt derives its timeouts from what remains (`services.executor.attempts`).
Cancellation: a cancelled call closes the provider's stream at once, and with it the
upstream HTTP response. A stream that breaks after its answer started ends as
STREAM_INTERRUPTED carrying the usage so far, counted with the tokenizer.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import Span, SpanKind

from services.common import semconv, telemetry
from services.common.calls import Deadline
from services.common.catalog import Catalog, ModelConfig
from services.common.errors import (
    FieldViolation,
    ModelNotFound,
    ProviderError,
    RequestInvalid,
    StreamInterrupted,
)
from services.common.validation import check_generation
from services.executor import tokens
from services.executor.attempts import Attempts, RetryBudget
from services.executor.providers.base import (
    Completion,
    Content,
    Embeddings,
    Finished,
    Provider,
    ProviderRequest,
    TextDelta,
    ToolCallPiece,
)
from strata.common.v1 import common_pb2

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
MAX_EMBED_INPUTS = 2048


@dataclass(frozen=True, slots=True)
class Execution:
    """A validated call, bound to its provider."""

    request: ProviderRequest
    attempts: Attempts
    provider_name: str = ""
    """gen_ai.provider.name: the provider's kind (openai, anthropic), or the catalog's name
    for an OpenAI-compatible server."""

    @property
    def model(self) -> ModelConfig:
        """The model that answers."""
        return self.request.model

    async def stream(self) -> AsyncGenerator[Content, None]:
        """The answer's pieces then Finished; the upstream call closes with this generator."""
        output: list[str] = []
        started = False
        with _chat_span(self) as span:
            begun = time.monotonic()
            try:
                async with aclosing(self.attempts.stream(self.request)) as events:
                    async for event in events:
                        if not started:
                            started = True
                            _first_token(self, span, time.monotonic() - begun)
                        if isinstance(event, TextDelta):
                            output.append(event.text)
                        elif isinstance(event, ToolCallPiece):
                            output.append(event.delta.arguments_json)
                        elif isinstance(event, Finished):
                            _finished(self, span, event, "".join(output), begun)
                        yield event
            except ProviderError as err:
                _failed(self, span, err, begun)
                if not started:
                    raise
                raise interrupted(err, self.request, "".join(output)) from err

    async def complete(self) -> Completion:
        """The whole answer."""
        with _chat_span(self) as span:
            begun = time.monotonic()
            try:
                answer = await self.attempts.complete(self.request)
            except ProviderError as err:
                _failed(self, span, err, begun)
                raise
            _finished(self, span, answer, answer.text, begun)
            return answer


# --- telemetry: one `chat {model}` span per call to a provider -------------------------------

_SERVICE = "executor"


def _chat_span(execution: Execution) -> Any:
    request = execution.request
    params = request.params
    attributes: dict[str, Any] = {
        semconv.GEN_AI_OPERATION_NAME: semconv.OPERATION_CHAT,
        semconv.GEN_AI_PROVIDER_NAME: execution.provider_name,
        semconv.GEN_AI_REQUEST_MODEL: request.model.name,
        semconv.GEN_AI_REQUEST_MAX_TOKENS: request.max_output_tokens,
        semconv.REQUEST_ID: request.request_id,
    }
    if params.HasField("temperature"):
        attributes[semconv.GEN_AI_REQUEST_TEMPERATURE] = params.temperature
    if params.HasField("top_p"):
        attributes[semconv.GEN_AI_REQUEST_TOP_P] = params.top_p
    if params.HasField("seed"):
        attributes[semconv.GEN_AI_REQUEST_SEED] = params.seed
    span = telemetry.tracer(_SERVICE).start_span(
        f"{semconv.OPERATION_CHAT} {request.model.name}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    )
    return telemetry.current_in_generator(span)


def _metric_attributes(execution: Execution) -> dict[str, str]:
    return {
        semconv.GEN_AI_OPERATION_NAME: semconv.OPERATION_CHAT,
        semconv.GEN_AI_PROVIDER_NAME: execution.provider_name,
        semconv.GEN_AI_REQUEST_MODEL: execution.request.model.name,
    }


def _first_token(execution: Execution, span: Span, elapsed_s: float) -> None:
    span.set_attribute(semconv.TIME_TO_FIRST_TOKEN_S, elapsed_s)
    telemetry.instruments(_SERVICE).time_to_first_token.record(
        elapsed_s, _metric_attributes(execution)
    )


def _finished(
    execution: Execution, span: Span, answer: Finished | Completion, output: str, begun: float
) -> None:
    usage = answer.usage
    reason = common_pb2.FinishReason.Name(answer.finish_reason).removeprefix("FINISH_REASON_")
    span.set_attributes(
        {
            semconv.GEN_AI_RESPONSE_MODEL: answer.provider_model or execution.model.upstream_model,
            semconv.GEN_AI_USAGE_INPUT_TOKENS: usage.input_tokens,
            semconv.GEN_AI_USAGE_OUTPUT_TOKENS: usage.output_tokens,
            semconv.GEN_AI_RESPONSE_FINISH_REASONS: [reason.lower()],
        }
    )
    made = telemetry.of(_SERVICE)
    attributes = {
        **_metric_attributes(execution),
        semconv.GEN_AI_RESPONSE_MODEL: answer.provider_model or execution.model.upstream_model,
    }
    made.instruments.operation_duration.record(time.monotonic() - begun, attributes)
    for kind, count in (("input", usage.input_tokens), ("output", usage.output_tokens)):
        made.instruments.token_usage.record(count, {**attributes, semconv.GEN_AI_TOKEN_TYPE: kind})
    if made.capture_content:
        _capture(execution, span, output, made.content_max_bytes)


def _failed(execution: Execution, span: Span, err: ProviderError, begun: float) -> None:
    telemetry.record_error(span, err)
    telemetry.instruments(_SERVICE).operation_duration.record(
        time.monotonic() - begun,
        {**_metric_attributes(execution), semconv.ERROR_TYPE: err.reason},
    )


def _capture(execution: Execution, span: Span, output: str, limit: int) -> None:
    """The prompt and the answer as a span event, redacted and cut at `limit` bytes each."""
    messages = [
        {"role": common_pb2.Role.Name(m.role).removeprefix("ROLE_").lower(), "content": m.content}
        for m in execution.request.messages
    ]
    prompt, prompt_cut = telemetry.capture(json.dumps(messages, ensure_ascii=False), limit)
    answer, answer_cut = telemetry.capture(
        json.dumps([{"role": "assistant", "content": output}], ensure_ascii=False), limit
    )
    span.add_event(
        semconv.EVENT_PROMPT,
        {
            semconv.GEN_AI_INPUT_MESSAGES: prompt,
            semconv.GEN_AI_OUTPUT_MESSAGES: answer,
            semconv.CONTENT_TRUNCATED: prompt_cut or answer_cut,
        },
    )


def interrupted(err: ProviderError, request: ProviderRequest, output: str) -> StreamInterrupted:
    """The error for a stream that broke after its answer started, with the usage so far."""
    usage = tokens.estimate_usage(request.messages, output)
    metadata = {
        **err.metadata,
        "input_tokens": str(usage.input_tokens),
        "output_tokens": str(usage.output_tokens),
        "usage_estimated": "true",
    }
    if not isinstance(err, StreamInterrupted):
        metadata["cause"] = err.reason
    return StreamInterrupted(err.message, metadata=metadata)


def _provider_name(name: str, kind: str) -> str:
    """gen_ai.provider.name of a catalog provider."""
    if kind == "openai_compatible":
        return name  # a server of the team's own: the catalog's name says which
    return f"strata.{kind}" if kind == "mock" else kind


def _page_token(last_alias: str) -> str:
    return base64.urlsafe_b64encode(last_alias.encode()).decode()


class Executor:
    """Runs calls against the catalog's providers."""

    def __init__(self, catalog: Catalog, providers: Mapping[str, Provider]) -> None:
        self._catalog = catalog
        self._providers = providers
        self._attempts = {
            name: Attempts(provider, RetryBudget(catalog.providers[name].retry_budget))
            for name, provider in providers.items()
        }
        self._aliases = sorted(catalog.models)
        self._provider_names = {
            name: name
            if p.kind == "openai_compatible"
            else f"strata.{p.kind}"
            if p.kind == "mock"
            else p.kind
            for name, p in catalog.providers.items()
        }

    def prepare(
        self,
        request_id: str,
        model: str,
        messages: Sequence[common_pb2.ChatMessage],
        params: common_pb2.GenerationParams,
        deadline: Deadline,
    ) -> Execution:
        """Validates a call; raises RequestInvalid or ModelNotFound."""
        config, max_output = check_generation(self._catalog, model, messages, params)
        request = ProviderRequest(
            model=config,
            messages=messages,
            params=params,
            max_output_tokens=max_output,
            deadline=deadline,
            request_id=request_id,
        )
        return Execution(
            request, self._attempts[config.provider], self._provider_names[config.provider]
        )

    async def embed(
        self, model: str, inputs: Sequence[str], deadline: Deadline
    ) -> tuple[ModelConfig, Embeddings]:
        """Embeds texts with an embedding model; raises RequestInvalid or ModelNotFound."""
        violations = []
        if not 1 <= len(inputs) <= MAX_EMBED_INPUTS:
            violations.append(FieldViolation("inputs", f"1 to {MAX_EMBED_INPUTS} texts"))
        if any(not text for text in inputs):
            violations.append(FieldViolation("inputs", "texts must not be empty"))
        if violations:
            raise RequestInvalid(violations)
        config = self._catalog.get(model)
        if config is None:
            raise ModelNotFound(model)
        if config.kind != "embedding":
            raise RequestInvalid.field("model", f"{model!r} is not an embedding model")
        embeddings = await self._providers[config.provider].embed(config, inputs, deadline)
        return config, embeddings

    def list_models(self, page_size: int, page_token: str) -> tuple[list[ModelConfig], str]:
        """A page of models in alias order, and the token of the next page ("" at the end)."""
        if page_size < 0:
            raise RequestInvalid.field("page_size", "must not be negative")
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start = 0
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode()).decode()
            except (binascii.Error, UnicodeDecodeError, ValueError):
                after = None
            # The decoder skips stray characters; only a token this API made round-trips.
            if after is None or _page_token(after) != page_token:
                raise RequestInvalid.field("page_token", "is not a token this API gave")
            start = next((i for i, a in enumerate(self._aliases) if a > after), len(self._aliases))
        page = self._aliases[start : start + size]
        more = start + size < len(self._aliases)
        token = _page_token(page[-1]) if more and page else ""
        return [self._catalog.models[a] for a in page], token

    async def aclose(self) -> None:
        """Closes every provider's connections."""
        for provider in self._providers.values():
            await provider.aclose()
