"""A real OTLP/gRPC receiver for tests: the services export to it as to a collector.

It serves the collector's trace and metrics services (the generated ones from
opentelemetry-proto) on 127.0.0.1 with a free port, from a thread pool, so synchronous
tests can start it, point `*_OTLP_ENDPOINT` at `endpoint`, and read what arrived:

    with OtlpReceiver() as receiver:
        ...  # run services with STRATA_<SVC>_OTLP_ENDPOINT=receiver.endpoint
        receiver.wait_for(lambda r: any(s.name == "chat mock-small" for s in r.spans()))
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import grpc
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SPAN_KINDS = {
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
}
STATUS_CODES = {
    trace_pb2.Status.STATUS_CODE_UNSET: "UNSET",
    trace_pb2.Status.STATUS_CODE_OK: "OK",
    trace_pb2.Status.STATUS_CODE_ERROR: "ERROR",
}


def any_value(value: common_pb2.AnyValue) -> Any:
    """The Python value of an OTLP AnyValue (arrays as lists, key-value lists as dicts)."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return attributes(value.kvlist_value.values)
    return getattr(value, kind)


def attributes(pairs: Any) -> dict[str, Any]:
    """OTLP KeyValue pairs as a dict."""
    return {pair.key: any_value(pair.value) for pair in pairs}


@dataclass(frozen=True)
class SpanEvent:
    name: str
    attributes: dict[str, Any]


@dataclass(frozen=True)
class SpanRecord:
    """One received span, flattened."""

    trace_id: str
    """32 hex digits."""
    span_id: str
    """16 hex digits."""
    parent_span_id: str
    """16 hex digits; "" for a root span."""
    name: str
    kind: str
    """SERVER, CLIENT, INTERNAL, ..."""
    service: str
    """The resource's service.name (e.g. strata-executor)."""
    attributes: dict[str, Any] = field(default_factory=dict)
    events: list[SpanEvent] = field(default_factory=list)
    status: str = "UNSET"
    """UNSET, OK or ERROR."""
    status_message: str = ""


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: Any
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        with self._receiver._lock:
            self._receiver.trace_requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()


class _Metrics(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: metrics_service_pb2.ExportMetricsServiceRequest, context: Any
    ) -> metrics_service_pb2.ExportMetricsServiceResponse:
        with self._receiver._lock:
            self._receiver.metric_requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class OtlpReceiver:
    """Collects every OTLP trace and metrics export sent to `endpoint`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.trace_requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self.metric_requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []
        self._server: grpc.Server | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        """What to give an OTLP/gRPC exporter (insecure)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="otlp"))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), server)
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(_Metrics(self), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self._server = server
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=None).wait(5)
            self._server = None

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def clear(self) -> None:
        """Forgets what arrived so far."""
        with self._lock:
            self.trace_requests.clear()
            self.metric_requests.clear()

    def spans(self) -> list[SpanRecord]:
        """Every span received so far, in arrival order."""
        with self._lock:
            requests = list(self.trace_requests)
        return [span for request in requests for span in _flatten(request)]

    def trace(self, trace_id: str) -> list[SpanRecord]:
        """The received spans of one trace."""
        return [span for span in self.spans() if span.trace_id == trace_id]

    def metric_names(self, service: str | None = None) -> set[str]:
        """Names of the metrics received so far (of one service.name, when given)."""
        with self._lock:
            requests = list(self.metric_requests)
        names: set[str] = set()
        for request in requests:
            for resource_metrics in request.resource_metrics:
                if service is not None and _service(resource_metrics.resource) != service:
                    continue
                for scope in resource_metrics.scope_metrics:
                    names.update(metric.name for metric in scope.metrics)
        return names

    def wait_for(
        self,
        predicate: Callable[[OtlpReceiver], bool],
        timeout: float = 10.0,
        message: str = "",
    ) -> None:
        """Polls until `predicate(self)` holds; fails the test with `message` at `timeout`."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not received after {timeout:.0f}s: {message or predicate}; "
                    f"spans: {sorted({(s.service, s.name) for s in self.spans()})}"
                )
            time.sleep(0.05)


def _service(resource: Any) -> str:
    return str(attributes(resource.attributes).get("service.name", ""))


def _flatten(request: trace_service_pb2.ExportTraceServiceRequest) -> Iterator[SpanRecord]:
    for resource_spans in request.resource_spans:
        service = _service(resource_spans.resource)
        for scope in resource_spans.scope_spans:
            for span in scope.spans:
                yield SpanRecord(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    name=span.name,
                    kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                    service=service,
                    attributes=attributes(span.attributes),
                    events=[SpanEvent(e.name, attributes(e.attributes)) for e in span.events],
                    status=STATUS_CODES.get(span.status.code, str(span.status.code)),
                    status_message=span.status.message,
                )
