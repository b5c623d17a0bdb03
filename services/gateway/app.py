"""The OpenAI-compatible HTTP door, mapped onto the orchestrator's gRPC API.

    POST /v1/chat/completions   Generate, or StreamGenerate as server-sent events
    GET  /v1/models             ListModels (model aliases, and routes by name)
    POST /v1/embeddings         Embed
    GET  /healthz               200 when the orchestrator reports SERVING

Requests carry the same `Authorization: Bearer <api key>` as gRPC calls and take the same
path (routes, guardrails, cache, budgets, one trace): the door only translates. A `model`
that names a route is sent as that route. `Idempotency-Key` (or `X-Request-Id`) becomes the
request id; `X-Strata-Cache: bypass` or `exact-only` sets the request's cache policy.
Errors come back in OpenAI's JSON shape with the HTTP status of the gRPC code (401, 403,
404, 400, 409, 429 with Retry-After, 503, 504), Strata's stable reason in `error.code` and
in the `x-strata-reason` header.

Streams follow OpenAI's chunk format (`chat.completion.chunk`, the role first, then content,
then the finish reason; usage in one last chunk when `stream_options.include_usage`), end
with `data: [DONE]` only when the answer is complete: a stream cut upstream ends with an
`error` event and no `[DONE]`, so a client can never take a cut answer for a whole one.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import struct
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import uvicorn
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from services.common import logs, loops, telemetry
from services.common.calls import open_channel
from services.common.errors import STATUS_DETAILS_KEY
from services.common.security import Trust
from services.common.settings import load_settings
from services.gateway.settings import GatewaySettings
from strata.common.v1 import common_pb2
from strata.orchestrator.v1 import orchestrator_pb2, orchestrator_pb2_grpc

log = logging.getLogger(__name__)

SERVICE = "gateway"
_ROLES = {
    "system": common_pb2.ROLE_SYSTEM,
    "developer": common_pb2.ROLE_SYSTEM,
    "user": common_pb2.ROLE_USER,
    "assistant": common_pb2.ROLE_ASSISTANT,
    "tool": common_pb2.ROLE_TOOL,
}
_FINISH = {
    common_pb2.FINISH_REASON_STOP: "stop",
    common_pb2.FINISH_REASON_LENGTH: "length",
    common_pb2.FINISH_REASON_CONTENT_FILTER: "content_filter",
    common_pb2.FINISH_REASON_TOOL_CALLS: "tool_calls",
}
_TOOL_CHOICE = {
    "auto": common_pb2.TOOL_CHOICE_MODE_AUTO,
    "none": common_pb2.TOOL_CHOICE_MODE_NONE,
    "required": common_pb2.TOOL_CHOICE_MODE_REQUIRED,
}
# gRPC code -> (HTTP status, OpenAI error type)
_HTTP = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.ABORTED: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class BadRequest(Exception):
    """The HTTP request cannot be translated; 400 naming the parameter (or, with
    `status_code` and `reason`, another client error: 413 for a body too large)."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status_code: int = 400,
        reason: str = "REQUEST_INVALID",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.reason = reason


# --- errors --------------------------------------------------------------------------------


def _error_body(
    message: str, kind: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _rpc_error(err: grpc.aio.AioRpcError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """HTTP status, OpenAI error body and headers for a gRPC error."""
    status_code, kind = _HTTP.get(err.code(), (500, "server_error"))
    reason, param, retry_s = None, None, None
    for key, value in err.trailing_metadata() or ():
        if key != STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        for detail in status_pb2.Status.FromString(value).details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason = info.reason
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                retry_s = retry.retry_delay.ToTimedelta().total_seconds()
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                if bad.field_violations:
                    param = bad.field_violations[0].field
    if reason is None:
        return _bare_rpc_error(err)
    if reason == "BUDGET_EXCEEDED":
        kind = "insufficient_quota"
    headers = {"x-strata-reason": reason}
    if retry_s is not None:
        headers["retry-after"] = str(max(1, int(retry_s + 0.999)))
    body = _error_body(err.details() or err.code().name, kind, reason, param)
    return status_code, body, headers


_TOO_LARGE = re.compile(r"larger than max|metadata size exceeds", re.I)
"""What gRPC itself says of a message or metadata over its limits."""


def _bare_rpc_error(err: grpc.aio.AioRpcError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """A status with no ErrorInfo: gRPC's own, not the orchestrator's (it is unreachable,
    the deadline passed on the wire, a limit of gRPC's). It gets a reason, as a service's
    call to another does (`errors.from_rpc_error`), and a message of ours: gRPC's text
    names internal addresses."""
    code = err.code()
    if code == grpc.StatusCode.CANCELLED:  # (its client left: no one reads this)
        status_code, kind, reason = 499, "cancelled", "CANCELLED"
        message = "the call was cancelled"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        status_code, kind, reason = 504, "timeout", "DEADLINE_EXCEEDED"
        message = "deadline exceeded waiting for the orchestrator"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and _TOO_LARGE.search(err.details() or ""):
        status_code, kind, reason = 413, "invalid_request_error", "REQUEST_TOO_LARGE"
        message = "the request (its headers or body) is larger than the orchestrator takes"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        status_code, kind, reason = 429, "rate_limit_error", "OVERLOADED"
        message = "the orchestrator is at its limit of calls in flight"
    else:
        status_code, kind, reason = 503, "service_unavailable", "ORCHESTRATOR_UNAVAILABLE"
        message = "the orchestrator is unavailable"
    headers = {"x-strata-reason": reason}
    if reason in ("OVERLOADED", "ORCHESTRATOR_UNAVAILABLE"):
        headers["retry-after"] = "1"
    return status_code, _error_body(message, kind, reason), headers


def _body_too_large(limit: int) -> BadRequest:
    return BadRequest(f"the body is larger than {limit} bytes", None, 413, "REQUEST_TOO_LARGE")


def _error_response(err: Exception) -> JSONResponse:
    if isinstance(err, BadRequest):
        return JSONResponse(
            _error_body(err.message, "invalid_request_error", err.reason, err.param),
            status_code=err.status_code,
            headers={"x-strata-reason": err.reason},
        )
    if isinstance(err, grpc.aio.AioRpcError):
        status_code, body, headers = _rpc_error(err)
        return JSONResponse(body, status_code=status_code, headers=headers)
    log.exception("internal error", exc_info=err)
    return JSONResponse(_error_body("internal error", "server_error", "INTERNAL"), 500)


# --- translation ---------------------------------------------------------------------------


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (other parts are refused)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise BadRequest("only text content parts are supported", f"{where}[{i}]")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise BadRequest("content must be a string or a list of text parts", where)


def _messages(raw: Any) -> list[common_pb2.ChatMessage]:
    if not isinstance(raw, list) or not raw:
        raise BadRequest("messages must be a non-empty list", "messages")
    messages = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or item.get("role") not in _ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {sorted(_ROLES)}", "messages")
        message = common_pb2.ChatMessage(
            role=_ROLES[item["role"]],
            content=_text(item.get("content"), f"messages[{i}].content"),
            name=str(item.get("name") or ""),
            tool_call_id=str(item.get("tool_call_id") or ""),
        )
        for call in item.get("tool_calls") or []:
            function = call.get("function") or {}
            message.tool_calls.add(
                id=str(call.get("id", "")),
                name=str(function.get("name", "")),
                arguments_json=str(function.get("arguments", "")),
            )
        messages.append(message)
    return messages


def _number(body: Mapping[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise BadRequest(f"{name} must be a number", name)
    return kind(value)


def _params(body: Mapping[str, Any]) -> common_pb2.GenerationParams:
    params = common_pb2.GenerationParams()
    if (temperature := _number(body, "temperature", float)) is not None:
        params.temperature = temperature
    if (top_p := _number(body, "top_p", float)) is not None:
        params.top_p = top_p
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    if max_tokens is not None:
        params.max_output_tokens = max_tokens
    if (seed := _number(body, "seed", int)) is not None:
        params.seed = seed
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise BadRequest("stop must be a string or a list of strings", "stop")
        params.stop.extend(stops)
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not function.get("name"):
            raise BadRequest("each tool needs a function with a name", "tools")
        params.tools.add(
            name=function["name"],
            description=str(function.get("description", "")),
            parameters_json=json.dumps(function.get("parameters") or {}),
        )
    choice = body.get("tool_choice")
    if isinstance(choice, str):
        if choice not in _TOOL_CHOICE:
            raise BadRequest(
                "tool_choice must be auto, none, required or a function", "tool_choice"
            )
        params.tool_choice.mode = _TOOL_CHOICE[choice]
    elif isinstance(choice, dict):
        params.tool_choice.mode = common_pb2.TOOL_CHOICE_MODE_FUNCTION
        params.tool_choice.function_name = str((choice.get("function") or {}).get("name", ""))
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_object":
            params.response_format.type = common_pb2.RESPONSE_FORMAT_TYPE_JSON_OBJECT
        elif kind == "json_schema":
            schema = response_format.get("json_schema") or {}
            params.response_format.type = common_pb2.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
            params.response_format.schema_name = str(schema.get("name", ""))
            params.response_format.json_schema = json.dumps(schema.get("schema") or {})
            params.response_format.strict = bool(schema.get("strict", False))
    return params


def _request_id(request: Request) -> str:
    return request.headers.get("idempotency-key") or request.headers.get("x-request-id") or ""


def _metadata(request: Request) -> list[tuple[str, str]]:
    authorization = request.headers.get("authorization", "")
    return [("authorization", authorization)] if authorization else []


def _usage(usage: common_pb2.Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": usage.output_tokens,
        "total_tokens": usage.input_tokens + usage.output_tokens,
    }


def _tool_calls(calls: Any) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments_json},
        }
        for c in calls
    ]


# --- the door ------------------------------------------------------------------------------


class Door:
    """The orchestrator channel and the handlers of the HTTP API."""

    def __init__(self, settings: GatewaySettings) -> None:
        self._settings = settings
        self._channel: grpc.aio.Channel | None = None
        self._stub: Any = None
        self._routes: tuple[float, frozenset[str]] = (0.0, frozenset())

    async def open(self) -> None:
        self._channel = open_channel(
            self._settings.orchestrator_address,
            self._settings.max_message_bytes,
            Trust.of(self._settings, public=True),
        )
        self._stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def app(self) -> Starlette:
        @contextlib.asynccontextmanager
        async def lifespan(_: Starlette) -> AsyncIterator[None]:
            await self.open()
            try:
                yield
            finally:
                await self.close()

        return Starlette(
            routes=[
                Route("/v1/chat/completions", self._traced(self.chat), methods=["POST"]),
                Route("/v1/models", self._traced(self.models), methods=["GET"]),
                Route("/v1/embeddings", self._traced(self.embeddings), methods=["POST"]),
                Route("/healthz", self.health, methods=["GET"]),
            ],
            lifespan=lifespan,
        )

    def _traced(self, handler: Any) -> Any:
        async def endpoint(request: Request) -> Response:
            parent = telemetry.extract_metadata(list(request.headers.items()))
            name = f"{request.method} {request.url.path}"
            span = telemetry.tracer(SERVICE).start_span(
                name,
                context=parent,
                kind=SpanKind.SERVER,
                attributes={"http.request.method": request.method, "url.path": request.url.path},
            )
            with trace.use_span(span, end_on_exit=False):
                try:
                    response: Response = await handler(request)
                except (BadRequest, grpc.aio.AioRpcError) as err:
                    response = _error_response(err)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR))
            if not isinstance(response, _Stream):
                span.end()  # (a stream ends its span when it ends)
            return response

        return endpoint

    def _deadline(self, request: Request) -> float:
        return self._settings.default_deadline_s

    async def _body(self, request: Request) -> dict[str, Any]:
        """The JSON object of the body, read up to the size the orchestrator takes (413
        REQUEST_TOO_LARGE past it, before it is all read: its length said, or as it comes)."""
        limit = self._settings.max_message_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _body_too_large(limit)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _body_too_large(limit)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("the body must be a JSON object") from None
        except RecursionError:
            raise BadRequest("the body nests too deeply") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    async def _route_names(self, request: Request) -> frozenset[str]:
        until, names = self._routes
        if time.monotonic() < until:
            return names
        try:
            listed = await self._stub.ListModels(
                orchestrator_pb2.ListModelsRequest(), metadata=_metadata(request), timeout=5
            )
        except grpc.aio.AioRpcError:
            return names  # the call itself will say what is wrong
        names = frozenset(r.name for r in listed.routes)
        self._routes = (time.monotonic() + self._settings.models_ttl_s, names)
        return names

    async def _generate_request(
        self, request: Request, body: Mapping[str, Any]
    ) -> orchestrator_pb2.GenerateRequest:
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model is required", "model")
        if body.get("n", 1) != 1:
            raise BadRequest("only n=1 is supported", "n")
        generate = orchestrator_pb2.GenerateRequest(
            messages=_messages(body.get("messages")),
            params=_params(body),
            request_id=_request_id(request),
        )
        if model in await self._route_names(request):
            generate.route = model
        else:
            generate.model = model
        for option in request.headers.get("x-strata-cache", "").split(","):
            match option.strip().lower():
                case "":
                    pass
                case "bypass":
                    generate.cache_policy.mode = common_pb2.CACHE_MODE_BYPASS
                case "exact-only":
                    generate.cache_policy.semantic_disabled = True
                case _:
                    raise BadRequest("x-strata-cache: bypass or exact-only", "x-strata-cache")
        if isinstance(body.get("metadata"), dict):
            generate.tags.update({str(k): str(v) for k, v in body["metadata"].items()})
        return generate

    # --- handlers ----------------------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        generate = await self._generate_request(request, body)
        if body.get("stream"):
            options = body.get("stream_options") or {}
            return await self._stream(request, generate, bool(options.get("include_usage")))
        answer: orchestrator_pb2.GenerateResponse = await self._stub.Generate(
            generate, metadata=_metadata(request), timeout=self._deadline(request)
        )
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        if answer.tool_calls:
            message["tool_calls"] = _tool_calls(answer.tool_calls)
            message["content"] = answer.text or None
        return JSONResponse(
            {
                "id": f"chatcmpl-{answer.request_id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": answer.model,
                "choices": [
                    {
                        "index": 0,
                        "message": message,
                        "finish_reason": _FINISH.get(answer.finish_reason, "stop"),
                        "logprobs": None,
                    }
                ],
                "usage": _usage(answer.usage),
            },
            headers={"x-request-id": answer.request_id},
        )

    async def _stream(
        self, request: Request, generate: orchestrator_pb2.GenerateRequest, include_usage: bool
    ) -> Response:
        streamed = orchestrator_pb2.StreamGenerateRequest()
        streamed.ParseFromString(generate.SerializeToString())
        call = self._stub.StreamGenerate(
            streamed, metadata=_metadata(request), timeout=self._deadline(request)
        )
        # Wait for the start chunk: an error before the answer is a plain HTTP error.
        try:
            first = await call.read()
        except grpc.aio.AioRpcError:
            call.cancel()
            raise
        if first is grpc.aio.EOF or first.WhichOneof("chunk") != "start":
            call.cancel()
            raise BadRequest("the orchestrator sent no start chunk")
        start = first.start
        created = int(time.time())
        span = trace.get_current_span()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            payload = {
                "id": f"chatcmpl-{start.request_id}",
                "object": "chat.completion.chunk",
                "created": created,
                "model": start.model,
                "choices": [
                    {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
                ],
            }
            if include_usage:
                payload["usage"] = None
            return _event(payload)

        async def events() -> AsyncIterator[bytes]:
            with telemetry.current_in_generator(span, end=False):
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    # read() to the end: a call read once may not be iterated as well.
                    while (item := await call.read()) is not grpc.aio.EOF:
                        kind = item.WhichOneof("chunk")
                        if kind == "delta":
                            delta: dict[str, Any] = {}
                            if item.delta.text:
                                delta["content"] = item.delta.text
                            if item.delta.tool_calls:
                                delta["tool_calls"] = [
                                    _tool_call_delta(d) for d in item.delta.tool_calls
                                ]
                            if delta:
                                yield chunk(delta)
                        elif kind == "final":
                            final = item.final
                            yield chunk({}, _FINISH.get(final.finish_reason, "stop"))
                            if include_usage:
                                yield _event(
                                    {
                                        "id": f"chatcmpl-{start.request_id}",
                                        "object": "chat.completion.chunk",
                                        "created": created,
                                        "model": start.model,
                                        "choices": [],
                                        "usage": _usage(final.usage),
                                    }
                                )
                            yield b"data: [DONE]\n\n"
                            return
                    # The stream ended without its final chunk: never pass it off as whole.
                    yield _event(
                        _error_body("the answer was cut off", "server_error", "STREAM_INTERRUPTED")
                    )
                except grpc.aio.AioRpcError as err:
                    _, body, _ = _rpc_error(err)
                    span.set_status(Status(StatusCode.ERROR, body["error"]["code"] or ""))
                    yield _event(body)
                finally:
                    call.cancel()
                    span.end()

        return _Stream(
            events(),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-request-id": start.request_id},
        )

    async def models(self, request: Request) -> Response:
        listed = await self._stub.ListModels(
            orchestrator_pb2.ListModelsRequest(), metadata=_metadata(request), timeout=10
        )
        entries = [
            {"id": m.name, "object": "model", "created": 0, "owned_by": "strata", "kind": m.kind}
            for m in listed.models
        ]
        entries += [
            {"id": r.name, "object": "model", "created": 0, "owned_by": "strata", "kind": "route"}
            for r in listed.routes
        ]
        return JSONResponse({"object": "list", "data": entries})

    async def embeddings(self, request: Request) -> Response:
        body = await self._body(request)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("model is required", "model")
        raw = body.get("input")
        inputs = [raw] if isinstance(raw, str) else raw
        if not isinstance(inputs, list) or not all(isinstance(t, str) for t in inputs):
            raise BadRequest("input must be a string or a list of strings", "input")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise BadRequest("encoding_format must be float or base64", "encoding_format")
        answer = await self._stub.Embed(
            orchestrator_pb2.EmbedRequest(
                model=model, inputs=inputs, request_id=_request_id(request)
            ),
            metadata=_metadata(request),
            timeout=self._deadline(request),
        )
        return JSONResponse(
            {
                "object": "list",
                "model": answer.model,
                "data": [
                    {"object": "embedding", "index": i, "embedding": _vector(e.values, encoding)}
                    for i, e in enumerate(answer.embeddings)
                ],
                "usage": {
                    "prompt_tokens": answer.usage.input_tokens,
                    "total_tokens": answer.usage.input_tokens,
                },
            },
            headers={"x-request-id": answer.request_id},
        )

    async def health(self, request: Request) -> Response:
        try:
            reply = await health_pb2_grpc.HealthStub(self._channel).Check(
                health_pb2.HealthCheckRequest(), timeout=2
            )
        except grpc.aio.AioRpcError as err:
            return JSONResponse({"status": "NOT_SERVING", "error": err.code().name}, 503)
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return JSONResponse({"status": status}, 200 if serving else 503)


class _Stream(StreamingResponse):
    """A streamed answer; it ends the request's span itself, when the stream ends."""


def _tool_call_delta(delta: common_pb2.ToolCallDelta) -> dict[str, Any]:
    out: dict[str, Any] = {"index": delta.index, "type": "function", "function": {}}
    if delta.id:
        out["id"] = delta.id
    if delta.name:
        out["function"]["name"] = delta.name
    out["function"]["arguments"] = delta.arguments_json
    return out


def _vector(values: Any, encoding: str) -> list[float] | str:
    """A vector as floats, or as base64 of little-endian float32 (what the SDKs ask for)."""
    if encoding == "base64":
        return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()
    return list(values)


def _event(payload: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


# --- running -------------------------------------------------------------------------------


class RunningGateway:
    """A started door: its port, and how to stop it."""

    def __init__(self, server: uvicorn.Server, task: asyncio.Task[None], port: int) -> None:
        self.server = server
        self.port = port
        self._task = task

    async def stop(self) -> None:
        self.server.should_exit = True
        await self._task

    async def wait(self) -> None:
        """Until the server stops (uvicorn stops on SIGTERM and SIGINT)."""
        await self._task


async def start(settings: GatewaySettings) -> RunningGateway:
    """Serves the door on settings.host:port (0: any free port); returns once it listens."""
    made = telemetry.configure_from(SERVICE, settings)
    door = Door(settings)
    config = uvicorn.Config(
        door.app(),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        # The C parser (h11, uvicorn's fallback, parses in Python: bench/RESULTS.md).
        http="httptools",
        timeout_keep_alive=settings.keep_alive_s,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s),
    )
    server = uvicorn.Server(config)  # (it drains on SIGTERM and SIGINT by itself)

    async def serve() -> None:
        try:
            await server.serve()
        finally:
            await asyncio.to_thread(telemetry.release, SERVICE, made)

    task = asyncio.create_task(serve(), name="gateway")
    while not server.started:
        if task.done():
            await task
            raise RuntimeError("the gateway did not start")
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    if settings.port_file is not None:
        tmp = settings.port_file.with_name(f".{settings.port_file.name}.tmp")
        tmp.write_text(f"{port}\n")
        tmp.replace(settings.port_file)
    log.info("gateway listening on %s:%d", settings.host, port)
    return RunningGateway(server, task, port)


async def run(settings: GatewaySettings) -> None:
    """Serves until SIGTERM or SIGINT, then drains open requests within the grace."""
    logs.configure(SERVICE, settings.log_level)
    running = await start(settings)
    await running.wait()
    log.info("gateway stopped")


def main() -> None:
    settings = load_settings(GatewaySettings)
    loops.run(run(settings), settings.event_loop)
