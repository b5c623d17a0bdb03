"""Traces and metrics: one trace per request across the four services.

Each service process configures its own tracer and meter providers (`configure`, called by
the bootstrap), named after the service. W3C trace context goes over every hop: the client
side writes `traceparent` into each call's metadata (`inject_metadata`, on every call of a
`services.common.calls.CallerChannel`), the server side opens the call's SERVER span under
it (`server_tracing`), so a request is one trace over orchestrator, control, cache and
executor. Spans go to an OTLP collector through a bounded batch queue (a slow or
absent collector costs requests nothing: when the queue is full spans are dropped and the
SDK counts them in `otel.sdk.processor.span.processed`); metrics go to OTLP and to a
Prometheus scrape endpoint, when those are configured.

Code asks for its service's tracer and instruments with `tracer(service)` and
`instruments(service)` at use, so objects built before `configure` still report to the
configured providers (and to no-op ones in unit tests that configure nothing).

Spans are recorded only once a provider has somewhere to send them (an exporter, or a
test's processor): with no OTLP endpoint every span would be built, timed and thrown away,
on every hop of every request. Unrecorded, a span still carries the trace on: the same
trace id (a caller's, or a new one for the request's records), marked not sampled, so a
service further on records nothing of it either. Trace from every service or from none.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from opentelemetry import context as otel_context
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common import semconv
from services.common.errors import RequestInvalid, StrataError
from services.common.interception import Wrap, around_each_call
from services.common.settings import ServiceSettings

log = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
_CARRIED = frozenset({"traceparent", "tracestate"})


@dataclass
class Instruments:
    """The metrics a service records (created once per configured service)."""

    token_usage: metrics.Histogram
    operation_duration: metrics.Histogram
    time_to_first_token: metrics.Histogram
    cost: metrics.Counter
    cache_results: metrics.Counter
    admission_denials: metrics.Counter
    retries: metrics.Counter
    fallbacks: metrics.Counter
    requests: metrics.Counter
    gauges: dict[str, dict[tuple[tuple[str, str], ...], float]] = field(default_factory=dict)
    """Values of the observable gauges, by metric name and attributes (set with `gauge`)."""

    def gauge(self, name: str, value: float, **attributes: str) -> None:
        """Sets an observable gauge's current value (read at each collection)."""
        self.gauges.setdefault(name, {})[tuple(sorted(attributes.items()))] = value


def _instruments(meter: metrics.Meter) -> Instruments:
    made = Instruments(
        token_usage=meter.create_histogram(
            semconv.METRIC_TOKEN_USAGE,
            unit="{token}",
            description="Tokens used per model call, by type (input, output).",
            explicit_bucket_boundaries_advisory=[
                1,
                4,
                16,
                64,
                256,
                1024,
                4096,
                16384,
                65536,
                262144,
                1048576,
            ],
        ),
        operation_duration=meter.create_histogram(
            semconv.METRIC_OPERATION_DURATION,
            unit="s",
            description="Duration of model calls.",
            explicit_bucket_boundaries_advisory=[
                0.01,
                0.02,
                0.04,
                0.08,
                0.16,
                0.32,
                0.64,
                1.28,
                2.56,
                5.12,
                10.24,
                20.48,
                40.96,
                81.92,
            ],
        ),
        time_to_first_token=meter.create_histogram(
            semconv.METRIC_TIME_TO_FIRST_TOKEN,
            unit="s",
            description="Time from a streamed model call's start to its first token.",
            explicit_bucket_boundaries_advisory=[
                0.001,
                0.005,
                0.01,
                0.02,
                0.04,
                0.06,
                0.08,
                0.1,
                0.25,
                0.5,
                0.75,
                1.0,
                2.5,
                5.0,
                7.5,
                10.0,
            ],
        ),
        cost=meter.create_counter(
            semconv.METRIC_COST, unit="USD", description="Cost of requests, by tenant and model."
        ),
        cache_results=meter.create_counter(
            semconv.METRIC_CACHE_RESULTS,
            description="Cache lookups by result: exact, semantic, miss, bypass, error.",
        ),
        admission_denials=meter.create_counter(
            semconv.METRIC_ADMISSION_DENIALS, description="Requests refused, by reason."
        ),
        retries=meter.create_counter(
            semconv.METRIC_RETRIES, description="Provider calls retried, by model and reason."
        ),
        fallbacks=meter.create_counter(
            semconv.METRIC_FALLBACKS, description="Requests answered by a later candidate."
        ),
        requests=meter.create_counter(
            semconv.METRIC_REQUESTS, description="Generate requests, by outcome."
        ),
    )
    for name, unit, description in (
        (
            semconv.METRIC_BREAKER_STATE,
            "1",
            "Circuit breaker per model: 0 closed, 1 open, 2 half open.",
        ),
        (semconv.METRIC_JOB_QUEUE_DEPTH, "{job}", "Jobs queued or running, not yet acknowledged."),
        (semconv.METRIC_JOB_QUEUE_AGE, "s", "Age of the oldest job not yet acknowledged."),
        (
            semconv.METRIC_SETTLEMENTS_KEPT,
            "{settlement}",
            "Settlements control did not take yet, kept to be sent again.",
        ),
    ):
        meter.create_observable_gauge(
            name, callbacks=[_observe(made, name)], unit=unit, description=description
        )
    return made


def _observe(made: Instruments, name: str) -> Callable[[Any], list[metrics.Observation]]:
    def observe(_options: Any) -> list[metrics.Observation]:
        values = made.gauges.get(name, {})
        return [metrics.Observation(v, dict(attrs)) for attrs, v in list(values.items())]

    return observe


@dataclass
class Telemetry:
    """One service's providers and instruments."""

    service: str
    tracer_provider: TracerProvider
    meter_provider: MeterProvider
    instruments: Instruments
    capture_content: bool = False
    content_max_bytes: int = 4096
    metrics_port: int | None = None
    _stop_metrics_server: Callable[[], None] | None = None
    _tracer: trace.Tracer | None = None

    @property
    def tracer(self) -> trace.Tracer:
        # Made once: the SDK builds a new tracer on every get_tracer (about 7 µs), and every
        # call and step of a request asks for it.
        if self._tracer is None:
            self._tracer = self.tracer_provider.get_tracer(f"strata.{self.service}")
        return self._tracer

    def shutdown(self) -> None:
        """Flushes what is queued (bounded by the exporter's timeout) and stops exporting."""
        if self._stop_metrics_server is not None:
            self._stop_metrics_server()
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown(timeout_millis=2000)


_configured: dict[str, Telemetry] = {}


class _WhenRecorded(Sampler):
    """The provider's own sampler once spans have somewhere to go; until then, drop."""

    def __init__(self, inner: Sampler) -> None:
        self.inner = inner
        self.recording = False

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Any = None,
        links: Sequence[trace.Link] | None = None,
        trace_state: trace.TraceState | None = None,
    ) -> SamplingResult:
        if self.recording:
            return self.inner.should_sample(
                parent_context, trace_id, name, kind, attributes, links, trace_state
            )
        parent = trace.get_current_span(parent_context).get_span_context()
        return SamplingResult(Decision.DROP, None, parent.trace_state)

    def get_description(self) -> str:
        return f"WhenRecorded{{{self.inner.get_description()}}}"


class _Provider(TracerProvider):
    """A tracer provider whose spans are recorded from its first span processor on."""

    def __init__(self, resource: Resource) -> None:
        super().__init__(resource=resource)
        self.sampler = self._when_recorded = _WhenRecorded(self.sampler)

    def add_span_processor(self, span_processor: SpanProcessor) -> None:
        super().add_span_processor(span_processor)
        self._when_recorded.recording = True


def _unconfigured(service: str) -> Telemetry:
    # Spans still get ids (and carry a caller's trace on) but go nowhere.
    provider = MeterProvider(resource=_resource(service))
    return Telemetry(
        service,
        _Provider(_resource(service)),
        provider,
        _instruments(provider.get_meter(f"strata.{service}")),
    )


def _resource(service: str) -> Resource:
    return Resource.create({"service.name": f"strata-{service}", "service.namespace": "strata"})


def configure(
    service: str,
    *,
    otlp_endpoint: str | None = None,
    otlp_timeout_s: float = 2.0,
    span_queue_size: int = 2048,
    metrics_port: int | None = None,
    metrics_host: str = "127.0.0.1",
    metric_interval_s: float = 15.0,
    capture_content: bool = False,
    content_max_bytes: int = 4096,
) -> Telemetry:
    """Sets up the service's providers; replaces (and shuts down) an earlier setup."""
    readers: list[MetricReader] = []
    stop_server: Callable[[], None] | None = None
    bound_port = None
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        readers.append(
            PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=otlp_endpoint, insecure=True, timeout=otlp_timeout_s),
                export_interval_millis=metric_interval_s * 1000,
                export_timeout_millis=otlp_timeout_s * 1000,
            )
        )
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=True)
        reader = PrometheusMetricReader()
        # The reader registers with the global registry; serve this service's alone.
        from prometheus_client import REGISTRY

        REGISTRY.unregister(reader._collector)
        registry.register(reader._collector)
        readers.append(reader)
        server, thread = start_http_server(metrics_port, addr=metrics_host, registry=registry)
        bound_port = server.server_port

        def stop_server() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=2)
            # The reader's shutdown unregisters it from the global registry: put it back.
            registry.unregister(reader._collector)
            REGISTRY.register(reader._collector)

    meter_provider = MeterProvider(resource=_resource(service), metric_readers=readers)
    tracer_provider = _Provider(_resource(service))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # The SDK counts the spans its queue drops (otel.sdk.processor.span.processed,
        # error.type=queue_full) when its internal metrics are on: on unless set otherwise.
        os.environ.setdefault("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")

        tracer_provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True, timeout=otlp_timeout_s),
                max_queue_size=span_queue_size,
                max_export_batch_size=min(512, span_queue_size),
                schedule_delay_millis=500,
                export_timeout_millis=otlp_timeout_s * 1000,
                meter_provider=meter_provider,
            )
        )
    made = Telemetry(
        service,
        tracer_provider,
        meter_provider,
        _instruments(meter_provider.get_meter(f"strata.{service}")),
        capture_content=capture_content,
        content_max_bytes=content_max_bytes,
        metrics_port=bound_port,
        _stop_metrics_server=stop_server,
    )
    old = _configured.get(service)
    _configured[service] = made
    if old is not None:
        old.shutdown()
    return made


def configure_from(service: str, settings: ServiceSettings) -> Telemetry:
    """`configure` with a service's settings."""
    return configure(
        service,
        otlp_endpoint=settings.otlp_endpoint,
        otlp_timeout_s=settings.otlp_timeout_s,
        span_queue_size=settings.span_queue_size,
        metrics_port=settings.metrics_port,
        metrics_host=settings.host,
        metric_interval_s=settings.metric_export_interval_s,
        capture_content=settings.capture_content,
        content_max_bytes=settings.content_max_bytes,
    )


def release(service: str, made: Telemetry) -> None:
    """Shuts down the service's telemetry if `made` is still the configured one."""
    if _configured.get(service) is made:
        del _configured[service]
    made.shutdown()


def of(service: str) -> Telemetry:
    """The service's telemetry (a no-export one when nothing was configured)."""
    made = _configured.get(service)
    if made is None:
        made = _configured[service] = _unconfigured(service)
    return made


def tracer(service: str) -> trace.Tracer:
    return of(service).tracer


def instruments(service: str) -> Instruments:
    return of(service).instruments


# --- content capture -------------------------------------------------------------------------


_redactor: Any = None


def redact(text: str) -> str:
    """`text` with personal data and secrets replaced (the guardrails' detectors)."""
    global _redactor
    if _redactor is None:
        from services.common.guardrails import Action, GuardrailProfile, Guardrails

        rules = {"pii": Action.REDACT, "secret": Action.REDACT}
        _redactor = Guardrails({"telemetry": GuardrailProfile(rules=rules)}, "telemetry")
    redacted = _redactor.check_output(text).redacted
    return str(redacted[0]) if redacted else text


def capture(text: str, limit: int) -> tuple[str, bool]:
    """Content as it may be recorded: redacted, then cut at `limit` bytes; and whether cut."""
    return clip(redact(text), limit)


def clip(text: str, limit: int) -> tuple[str, bool]:
    """`text` cut to at most `limit` UTF-8 bytes (on a character boundary); and whether cut."""
    data = text.encode()
    if len(data) <= limit:
        return text, False
    return data[:limit].decode(errors="ignore"), True


# --- errors on spans -------------------------------------------------------------------------


def record_error(span: Span, err: BaseException) -> None:
    """Marks the span failed, with `error.type` the stable reason when there is one."""
    reason = err.reason if isinstance(err, StrataError) else type(err).__name__
    span.set_attribute(semconv.ERROR_TYPE, reason)
    span.set_status(Status(StatusCode.ERROR, reason))


# --- gRPC: trace context over every hop ------------------------------------------------------


def inject_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> list[Any]:
    """The call's metadata plus the current trace context."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    out = [item for item in (metadata or ()) if item[0] not in _CARRIED]
    out.extend(carrier.items())
    return out


def inject_context(carrier: dict[str, str], context: otel_context.Context) -> None:
    """Writes `context`'s trace context (`traceparent`, `tracestate`) into `carrier`."""
    _PROPAGATOR.inject(carrier, context)


def extract_metadata(metadata: Sequence[tuple[str, Any]] | None) -> otel_context.Context:
    carrier = {k: v for k, v in (metadata or ()) if k in _CARRIED and isinstance(v, str)}
    return _PROPAGATOR.extract(carrier)


class _Undecodable:
    """A request whose bytes are not the method's message (e.g. strings of bad UTF-8)."""

    def __init__(self, problem: str) -> None:
        self.problem = problem

    def error(self) -> StrataError:
        return RequestInvalid.field("request", f"is not a valid message: {self.problem}")


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The method's deserializer, turning a parse failure into INVALID_ARGUMENT (grpc would
    answer UNKNOWN, naming the message type)."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except DecodeError as err:
            return _Undecodable("bad UTF-8" if "UTF-8" in str(err) else "cannot be parsed")

    return parse


def server_tracing(service: str) -> Wrap:
    """Opens each call's SERVER span under the caller's trace context (health and
    reflection calls have none); a request that cannot be parsed is refused with
    INVALID_ARGUMENT."""

    def wrap(method: str, handler: Any) -> Any:
        if method.startswith("/grpc."):
            return handler
        full_service, _, name = method.lstrip("/").partition("/")
        attributes = {
            semconv.RPC_SYSTEM: "grpc",
            semconv.RPC_SERVICE: full_service,
            semconv.RPC_METHOD: name,
        }
        span_name = method.lstrip("/")

        def start(context: grpc.aio.ServicerContext[Any, Any]) -> Span:
            parent = extract_metadata(context.invocation_metadata())
            return tracer(service).start_span(
                span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes
            )

        def finish(span: Span, context: Any, err: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            if isinstance(err, StrataError):
                record_error(span, err)
            elif code not in (None, grpc.StatusCode.OK, 0):
                status = code if isinstance(code, grpc.StatusCode) else None
                span.set_status(Status(StatusCode.ERROR, status.name if status else str(code)))
            if isinstance(code, grpc.StatusCode):
                span.set_attribute(semconv.RPC_GRPC_STATUS_CODE, code.value[0])
            span.end()

        @contextlib.asynccontextmanager
        async def traced(request: Any, context: Any) -> AsyncIterator[None]:
            span = start(context)
            token = otel_context.attach(trace.set_span_in_context(span))
            err: BaseException | None = None
            try:
                if isinstance(request, _Undecodable):
                    err = request.error()
                    await context.abort_with_status(err.to_status())
                yield
            except BaseException as caught:
                err = err or caught
                raise
            finally:
                _detach(token)
                finish(span, context, err)

        return around_each_call(handler, traced, _tolerant(handler.request_deserializer))

    return wrap


def _detach(token: contextvars.Token[Any]) -> None:
    """Undoes an attach, where it was made. A stream closed from another task (or by the
    loop's finalizer) ends in another context, perhaps a copy of the one attached to: the
    attachment went with the context it was made in, and there is nothing to undo."""
    with contextlib.suppress(ValueError):
        token.var.reset(token)


@contextlib.contextmanager
def current_in_generator(span: Span, *, end: bool = True) -> Iterator[Span]:
    """Makes `span` current for a block that yields (an async generator's body).

    `trace.use_span` would detach in whatever context closes the generator, and a stream
    closed from another task closes it there: detach only where the span was attached.
    """
    token = otel_context.attach(trace.set_span_in_context(span))
    try:
        yield span
    finally:
        _detach(token)
        if end:
            span.end()


def current_trace_id() -> str:
    """The current trace's id as 32 hex digits ('' outside a trace)."""
    ctx = trace.get_current_span().get_span_context()
    return format(ctx.trace_id, "032x") if ctx.is_valid else ""


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Adds attributes to the current span."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({k: v for k, v in attributes.items() if v is not None})
