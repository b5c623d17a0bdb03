"""Pipelines: chains of generate, retrieve and extract steps declared in YAML.

    pipelines:
      triage:
        inputs: [{name: ticket, required: true}]
        steps:
          - {name: classify, kind: generate, model: mock-fast,
             messages: [{role: user, content: "Classify: {{ inputs.ticket }}"}]}
          - {name: category, kind: extract, from: classify, regex: "(billing|tech)",
             on_failure: fallback, fallback: other}
          - {name: docs, kind: retrieve, collection: faq, query: "{{ inputs.ticket }}",
             when: "steps.category.output == 'billing'"}
          - {name: answer, kind: generate, route: support,
             template: {name: support_answer}, variables: {question: "{{ inputs.ticket }}"}}
        outputs: {category: "{{ steps.category.output }}", answer: "{{ steps.answer.output }}"}

Strings are Jinja2 in a sandbox over `inputs` and `steps.<name>.output` (earlier steps only);
`when` is an expression: false skips the step. Each step has a timeout and a failure policy:
`fail` stops the pipeline, `skip` goes on without an output, `fallback` goes on with the
fallback value. A generate step is an ordinary generate call (admitted, cached, settled on
its own under `<request id>.<step>`), so usage and cost add up per pipeline.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from contextlib import aclosing
from pathlib import Path
from typing import Any, Literal

import grpc
import yaml
from google.protobuf import duration_pb2, json_format, struct_pb2
from jinja2 import StrictUndefined
from jinja2.exceptions import TemplateError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from services.common import semconv, telemetry
from services.common.calls import Deadline
from services.common.errors import (
    FieldViolation,
    PipelineNotFound,
    RequestInvalid,
    StepFailed,
    StrataError,
)
from services.common.settings import ConfigError
from services.common.validation import check_name, check_request_id, check_struct
from services.orchestrator.generation import Answer, Generator
from services.orchestrator.knowledge import KnowledgeStore
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, pipelines_pb2

_ENV = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_STEP_REFERENCE = re.compile(r"\bsteps\.(\w+)")
_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Spec):
    """A declared input."""

    name: str = Field(pattern=r"^[A-Za-z_]\w*$")
    required: bool = True
    default: Any = None


class MessageSpec(_Spec):
    """A message of a generate step; its content is a template string."""

    role: Literal["system", "user", "assistant"]
    content: str


class StepSpec(_Spec):
    """One step."""

    name: str = Field(pattern=r"^[A-Za-z_]\w*$")
    kind: Literal["generate", "retrieve", "extract"]
    when: str | None = None
    """An expression; false skips the step."""
    timeout_s: float = Field(default=60.0, gt=0)
    on_failure: Literal["fail", "skip", "fallback"] = "fail"
    fallback: Any = None
    # generate
    model: str = ""
    route: str = ""
    template: dict[str, str] | None = None
    variables: dict[str, str] = Field(default_factory=dict)
    messages: list[MessageSpec] = Field(default_factory=list)
    documents: str = ""
    """A retrieve step whose chunks fill the template's `documents` variable."""
    max_output_tokens: int | None = Field(default=None, gt=0)
    temperature: float | None = Field(default=None, ge=0, le=2)
    # retrieve
    collection: str = ""
    query: str = ""
    top_k: int = Field(default=4, ge=1, le=50)
    min_score: float = Field(default=0.0, ge=-1, le=1)
    max_age_s: float | None = Field(default=None, gt=0)
    metadata_filter: dict[str, str] = Field(default_factory=dict, alias="filter")
    # extract
    source: str = Field(default="", alias="from")
    regex: str | None = None
    json_field: str | None = Field(default=None, alias="json")

    @model_validator(mode="after")
    def _kind_fields(self) -> StepSpec:
        if self.kind == "generate":
            if bool(self.model) == bool(self.route):
                raise ValueError(f"step {self.name}: give a model or a route")
            if not self.messages and not self.template:
                raise ValueError(f"step {self.name}: give messages or a template")
            if self.documents and not self.template:
                raise ValueError(f"step {self.name}: documents fill a template's variable")
        elif self.kind == "retrieve" and not (self.collection and self.query):
            raise ValueError(f"step {self.name}: a retrieve step needs collection and query")
        elif self.kind == "extract":
            if not self.source or (self.regex is None) == (self.json_field is None):
                raise ValueError(f"step {self.name}: an extract step needs from and regex or json")
            if self.regex is not None:
                re.compile(self.regex)
        return self


class PipelineSpec(_Spec):
    """A pipeline."""

    inputs: list[InputSpec] = Field(default_factory=list)
    steps: list[StepSpec]
    outputs: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _references(self) -> PipelineSpec:
        seen: set[str] = set()
        for step in self.steps:
            if step.name in seen:
                raise ValueError(f"two steps are named {step.name}")
            texts = [step.when or "", step.query, *step.variables.values()]
            texts += [m.content for m in step.messages]
            for name in {m for t in texts for m in _STEP_REFERENCE.findall(t)}:
                if name not in seen:
                    raise ValueError(f"step {step.name} refers to {name}, not an earlier step")
            if step.kind == "extract" and step.source not in seen:
                raise ValueError(f"step {step.name} extracts from {step.source}, not earlier")
            if step.documents and step.documents not in seen:
                raise ValueError(
                    f"step {step.name} takes documents of {step.documents}, not earlier"
                )
            seen.add(step.name)
        for output, text in self.outputs.items():
            for name in _STEP_REFERENCE.findall(text):
                if name not in seen:
                    raise ValueError(f"output {output} refers to unknown step {name}")
        return self


def load_pipelines(path: Path) -> dict[str, PipelineSpec]:
    """Reads a pipelines file; ConfigError naming the file and the problem."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
        specs = {
            name: PipelineSpec.model_validate(spec)
            for name, spec in (raw.get("pipelines") or {}).items()
        }
        for spec in specs.values():
            for text in _templates_of(spec):
                _ENV.parse(text)
    except (
        OSError,
        UnicodeDecodeError,
        yaml.YAMLError,
        ValidationError,
        ValueError,
        TemplateError,
        AttributeError,
    ) as err:
        raise ConfigError(f"invalid pipelines file {path}: {err}") from err
    return specs


def _templates_of(spec: PipelineSpec) -> list[str]:
    texts = list(spec.outputs.values())
    for step in spec.steps:
        texts += [step.query, *step.variables.values(), *(m.content for m in step.messages)]
    return [t for t in texts if t]


GenerateCall = Callable[[orchestrator_pb2.GenerateRequest], Awaitable[Answer]]
TenantOf = Callable[[], Awaitable[str]]


class PipelineRunner:
    """Runs pipelines through the generator and the knowledge store."""

    def __init__(
        self,
        pipelines: Mapping[str, PipelineSpec],
        generator: Generator,
        knowledge: KnowledgeStore | None,
    ) -> None:
        self._pipelines = dict(pipelines)
        self._generator = generator
        self._knowledge = knowledge

    def names(self) -> list[str]:
        """The pipelines' names."""
        return sorted(self._pipelines)

    async def run(
        self,
        request: pipelines_pb2.RunPipelineRequest | pipelines_pb2.StreamPipelineRequest,
        api_key: str,
        deadline: Deadline,
        tenant_of: TenantOf,
    ) -> AsyncGenerator[pipelines_pb2.StepResult | pipelines_pb2.RunPipelineResponse, None]:
        """Yields each step's result, then the pipeline's response."""
        check_run(request)
        spec = self._pipelines.get(request.pipeline)
        if spec is None:
            raise PipelineNotFound(
                f"no pipeline {request.pipeline!r}", metadata={"pipeline": request.pipeline}
            )
        request_id = request.request_id or uuid.uuid4().hex
        inputs = _inputs(spec, json_format.MessageToDict(request.inputs))
        context: dict[str, Any] = {"inputs": inputs, "steps": {}}
        result = pipelines_pb2.RunPipelineResponse(request_id=request_id)
        telemetry.set_attributes(
            {semconv.PIPELINE: request.pipeline, semconv.REQUEST_ID: request_id}
        )
        for step in spec.steps:
            with telemetry.tracer("orchestrator").start_as_current_span(
                f"{semconv.SPAN_PIPELINE_STEP} {step.name}",
                attributes={semconv.PIPELINE_STEP: step.name, semconv.KIND: step.kind},
            ) as span:
                outcome, code = await self._step(
                    step, context, request_id, api_key, deadline, tenant_of
                )
                state = pipelines_pb2.StepState.Name(outcome.state).removeprefix("STEP_STATE_")
                span.set_attribute(semconv.STATE, state.lower())
                if outcome.error_reason:
                    span.set_attribute(semconv.ERROR_TYPE, outcome.error_reason)
            result.steps.append(outcome)
            result.usage.input_tokens += outcome.usage.input_tokens
            result.usage.output_tokens += outcome.usage.output_tokens
            result.cost.input_usd_micros += outcome.cost.input_usd_micros
            result.cost.output_usd_micros += outcome.cost.output_usd_micros
            result.cost.total_usd_micros += outcome.cost.total_usd_micros
            yield outcome
            if outcome.state == pipelines_pb2.STEP_STATE_FAILED:
                raise StepFailed(
                    f"step {step.name} failed ({outcome.error_reason})",
                    code=code,
                    reason=outcome.error_reason or "STEP_FAILED",
                    metadata={"pipeline": request.pipeline, "step": step.name},
                )
        for name, text in spec.outputs.items():
            result.outputs[name] = _render(text, context)
        yield result

    async def _step(
        self,
        step: StepSpec,
        context: dict[str, Any],
        request_id: str,
        api_key: str,
        deadline: Deadline,
        tenant_of: TenantOf,
    ) -> tuple[pipelines_pb2.StepResult, grpc.StatusCode]:
        """The step's result, and the code of its error (OK when it did not fail)."""
        started = time.monotonic()
        outcome = pipelines_pb2.StepResult(step=step.name)
        output: Any = None
        code = grpc.StatusCode.OK
        try:
            if step.when is not None and not _ENV.compile_expression(step.when)(**context):
                outcome.state = pipelines_pb2.STEP_STATE_SKIPPED
                context["steps"][step.name] = {"output": None, "state": "skipped"}
                return outcome, code
            async with asyncio.timeout(min(step.timeout_s, deadline.remaining())):
                output = await self._execute(
                    step, context, outcome, request_id, api_key, deadline, tenant_of
                )
            outcome.state = pipelines_pb2.STEP_STATE_SUCCEEDED
        except (StrataError, TimeoutError, TemplateError, ValueError) as err:
            if isinstance(err, StrataError):
                reason, code = err.reason, err.code
            elif isinstance(err, TimeoutError):
                reason, code = "STEP_TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED
            else:
                reason, code = "STEP_INVALID", grpc.StatusCode.INTERNAL
            outcome.error_reason = reason
            if step.on_failure == "fail":
                outcome.state = pipelines_pb2.STEP_STATE_FAILED
            else:
                outcome.state = pipelines_pb2.STEP_STATE_RECOVERED
                output = step.fallback if step.on_failure == "fallback" else None
        finally:
            outcome.duration.CopyFrom(_duration(time.monotonic() - started))
        context["steps"][step.name] = {"output": output, "state": "done"}
        if output is not None:
            outcome.output.CopyFrom(json_format.ParseDict(output, struct_pb2.Value()))
        return outcome, code

    async def _execute(
        self,
        step: StepSpec,
        context: dict[str, Any],
        outcome: pipelines_pb2.StepResult,
        request_id: str,
        api_key: str,
        deadline: Deadline,
        tenant_of: TenantOf,
    ) -> Any:
        if step.kind == "extract":
            return _extract(step, context["steps"][step.source]["output"])
        if step.kind == "retrieve":
            if self._knowledge is None:
                raise RequestInvalid.field("steps", "retrieval is not configured on this server")
            chunks = await self._knowledge.search(
                await tenant_of(),
                step.collection,
                _render(step.query, context),
                top_k=step.top_k,
                min_score=step.min_score,
                max_age_s=step.max_age_s,
                metadata_filter=step.metadata_filter,
            )
            return [
                {
                    "text": c.text,
                    "document_id": c.document_id,
                    "version": c.version,
                    "chunk": c.chunk,
                    "score": c.score,
                }
                for c in chunks
            ]
        call = orchestrator_pb2.GenerateRequest(
            model=step.model,
            route=step.route,
            request_id=f"{request_id}.{step.name}",
            messages=[
                common_pb2.ChatMessage(role=_ROLES[m.role], content=_render(m.content, context))
                for m in step.messages
            ],
        )
        if step.template:
            call.template.name = step.template.get("name", "")
            call.template.version = step.template.get("version", "")
            call.template.variables.update(
                {k: _render(v, context) for k, v in step.variables.items()}
            )
            if step.documents:
                call.template.variables["documents"] = (
                    context["steps"][step.documents]["output"] or []
                )
        if step.max_output_tokens is not None:
            call.params.max_output_tokens = step.max_output_tokens
        if step.temperature is not None:
            call.params.temperature = step.temperature
        answer = Answer()
        events = self._generator.generate(call, api_key, deadline, stream=False)
        async with aclosing(events):
            async for event in events:
                answer.add(event)
        response = answer.build()
        outcome.usage.CopyFrom(response.usage)
        outcome.cost.CopyFrom(response.cost)
        return response.text


def check_run(
    request: pipelines_pb2.RunPipelineRequest | pipelines_pb2.StreamPipelineRequest,
    prefix: str = "",
) -> None:
    """INVALID_ARGUMENT for a malformed run (a name too long to echo, a bad request id,
    inputs too deep or holding NaN), before the pipeline is looked up. `prefix` names the
    request inside another (a job's `pipeline.`)."""
    violations = [
        v
        for v in (
            check_name(request.pipeline, "pipeline"),
            check_request_id(request.request_id) if request.request_id else None,
        )
        if v
    ]
    violations.extend(check_struct(request.inputs, "inputs"))
    if violations:
        raise RequestInvalid([FieldViolation(prefix + v.field, v.description) for v in violations])


def _inputs(spec: PipelineSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    declared = {i.name: i for i in spec.inputs}
    violations = [
        FieldViolation(f"inputs.{name}", "is not an input of the pipeline")
        for name in given
        if name not in declared
    ]
    values: dict[str, Any] = {}
    for name, spec_input in declared.items():
        if name in given:
            values[name] = given[name]
        elif spec_input.required:
            violations.append(FieldViolation(f"inputs.{name}", "is required"))
        else:
            values[name] = spec_input.default
    if violations:
        raise RequestInvalid(violations)
    return values


def _render(text: str, context: Mapping[str, Any]) -> str:
    try:
        return _ENV.from_string(text).render(**context)
    except TemplateError as err:
        raise RequestInvalid.field("pipeline", f"cannot render {text!r}: {err}") from err


def _extract(step: StepSpec, source: Any) -> Any:
    if source is None:
        raise ValueError(f"step {step.source} has no output")
    text = source if isinstance(source, str) else json.dumps(source)
    if step.regex is not None:
        found = re.search(step.regex, text)
        if found is None:
            raise ValueError("the pattern did not match")
        return found.group(1) if found.groups() else found.group(0)
    value: Any = json.loads(_json_part(text))
    for part in (step.json_field or "").split("."):
        if isinstance(value, list) and part.isdigit():
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            raise ValueError(f"no field {step.json_field!r}")
    return value


def _json_part(text: str) -> str:
    """The JSON object in a model's answer (which may wrap it in prose or a code fence)."""
    start, end = text.find("{"), text.rfind("}")
    return text[start : end + 1] if 0 <= start < end else text


def _duration(seconds: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(int(seconds * 1e9))
    return duration
