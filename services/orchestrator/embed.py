"""Embeddings through the public API: admitted by control, run by the executor, settled.

The same path as a generate call without the cache: the key is checked, the inputs pass
the input guardrails (redacted inputs are embedded redacted), the worst case is reserved
against the budgets, and what the executor reports is settled under the request id.
"""

from __future__ import annotations

import logging
import time
import uuid

from services.common import semconv, telemetry
from services.common.calls import Deadline
from services.common.catalog import Catalog
from services.common.errors import FieldViolation, ModelNotFound, RequestInvalid, StrataError
from services.common.tasks import Background
from services.common.validation import check_name, check_request_id, estimate_input_tokens
from services.orchestrator.clients import ControlClient, ExecutorClient
from strata.common.v1 import common_pb2
from strata.control.v1 import control_pb2
from strata.executor.v1 import executor_pb2
from strata.orchestrator.v1 import orchestrator_pb2

log = logging.getLogger(__name__)

MAX_INPUTS = 2048


class Embeddings:
    """Runs embed requests across control and the executor."""

    def __init__(self, catalog: Catalog, control: ControlClient, executor: ExecutorClient) -> None:
        self._catalog = catalog
        self._control = control
        self._executor = executor
        self._background = Background()

    async def embed(
        self, request: orchestrator_pb2.EmbedRequest, api_key: str, deadline: Deadline
    ) -> orchestrator_pb2.EmbedResponse:
        self._check(request)
        request_id = request.request_id or uuid.uuid4().hex
        messages = [
            common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content=text)
            for text in request.inputs
        ]
        telemetry.set_attributes({semconv.REQUEST_ID: request_id, semconv.MODEL: request.model})
        with telemetry.tracer("orchestrator").start_as_current_span(semconv.SPAN_ADMISSION):
            admission = await self._control.admit(
                control_pb2.AdmitRequest(
                    request_id=request_id,
                    api_key=api_key,
                    model=request.model,
                    estimated_input_tokens=estimate_input_tokens(messages),
                    max_output_tokens=1,
                    messages=messages,
                ),
                deadline,
            )
        telemetry.set_attributes({semconv.TENANT_ID: admission.tenant_id})
        inputs = [m.content for m in admission.redacted_messages] or list(request.inputs)
        started = time.monotonic()
        attempt = control_pb2.Attempt(model=request.model)
        settle = control_pb2.SettleRequest(
            request_id=request_id,
            tenant_id=admission.tenant_id,
            key_id=admission.key_id,
            team_id=admission.team_id,
            model=request.model,
            cache_status=common_pb2.CACHE_STATUS_BYPASS,
            admission=admission.admission,
        )
        try:
            answer = await self._executor.embed(
                executor_pb2.EmbedRequest(
                    request_id=request_id, model=request.model, inputs=inputs
                ),
                deadline,
            )
        except BaseException as err:
            cancelled = not isinstance(err, Exception)
            settle.outcome = (
                control_pb2.OUTCOME_CANCELLED if cancelled else control_pb2.OUTCOME_FAILURE
            )
            if isinstance(err, StrataError):
                attempt.error_reason = err.reason
            attempt.latency.FromNanoseconds(int((time.monotonic() - started) * 1e9))
            settle.attempts.append(attempt)
            self._background.run(self._settle(settle))
            raise
        attempt.success = True
        attempt.usage.CopyFrom(answer.usage)
        attempt.latency.FromNanoseconds(int((time.monotonic() - started) * 1e9))
        settle.outcome = control_pb2.OUTCOME_SUCCESS
        settle.usage.CopyFrom(answer.usage)
        settle.cost.CopyFrom(answer.cost)
        settle.attempts.append(attempt)
        with telemetry.tracer("orchestrator").start_as_current_span(semconv.SPAN_SETTLEMENT):
            await self._settle(settle, at_once=True)  # the reply waits for it
        return orchestrator_pb2.EmbedResponse(
            request_id=request_id,
            model=answer.model,
            embeddings=[orchestrator_pb2.Embedding(values=e.values) for e in answer.embeddings],
            usage=answer.usage,
            cost=answer.cost,
        )

    def _check(self, request: orchestrator_pb2.EmbedRequest) -> None:
        if violation := check_name(request.model, "model"):
            raise RequestInvalid([violation])
        model = self._catalog.get(request.model)
        if model is None:
            raise ModelNotFound(request.model)
        violations = []
        if request.request_id and (violation := check_request_id(request.request_id)):
            violations.append(violation)
        if model.kind != "embedding":
            violations.append(FieldViolation("model", "is not an embedding model"))
        if not 1 <= len(request.inputs) <= MAX_INPUTS:
            violations.append(FieldViolation("inputs", f"give 1 to {MAX_INPUTS} texts"))
        elif any(not text for text in request.inputs):
            violations.append(FieldViolation("inputs", "texts must not be empty"))
        if violations:
            raise RequestInvalid(violations)

    async def _settle(self, request: control_pb2.SettleRequest, at_once: bool = False) -> None:
        try:
            await self._control.settle(request, at_once)
        except StrataError as err:
            log.error("settlement refused (%s); the reservation will expire instead", err.reason)

    async def aclose(self) -> None:
        """Waits for background settlements to finish."""
        await self._background.drain()
