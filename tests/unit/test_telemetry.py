"""Telemetry wiring: a slow or absent collector costs spans (counted), never requests."""

from __future__ import annotations

import time

import httpx
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import telemetry


def test_spans_dropped_by_a_full_export_queue_are_counted() -> None:
    made = telemetry.configure(
        "unit-drops",
        otlp_endpoint="http://127.0.0.1:9",  # nothing listens: every export fails
        otlp_timeout_s=0.2,
        span_queue_size=4,
        metrics_port=0,
    )
    try:
        started = time.monotonic()
        for _ in range(200):
            made.tracer.start_span("work").end()
        # Ending spans never waits for the exporter.
        assert time.monotonic() - started < 1.0
        scraped = httpx.get(f"http://127.0.0.1:{made.metrics_port}/metrics", timeout=5).text
    finally:
        telemetry.release("unit-drops", made)
    dropped = [
        line
        for line in scraped.splitlines()
        if line.startswith("otel_sdk_processor_span_processed") and "queue_full" in line
    ]
    assert dropped, scraped
    assert float(dropped[0].rsplit(" ", 1)[1]) >= 150


def test_trace_context_goes_out_with_the_call_and_comes_back_in() -> None:
    tracer = telemetry.tracer("unit-context")
    with tracer.start_as_current_span("caller") as span:
        metadata = telemetry.inject_metadata([("x-request-id", "r1"), ("traceparent", "stale")])
    assert [k for k, _ in metadata].count("traceparent") == 1
    assert ("x-request-id", "r1") in metadata
    parent = telemetry.extract_metadata(metadata)
    with tracer.start_as_current_span("callee", context=parent) as child:
        assert child.get_span_context().trace_id == span.get_span_context().trace_id
        assert telemetry.current_trace_id() == format(span.get_span_context().trace_id, "032x")


def test_without_an_exporter_spans_are_not_built_but_the_trace_goes_on() -> None:
    made = telemetry.configure("unit-unexported")
    try:
        caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        parent = telemetry.extract_metadata([("traceparent", caller)])
        with made.tracer.start_as_current_span("call", context=parent) as span:
            assert not span.is_recording()
            assert telemetry.current_trace_id() == caller[3:35]  # the caller's trace
            sent = dict(telemetry.inject_metadata([]))
        assert sent["traceparent"].startswith(f"00-{caller[3:35]}-")
        assert sent["traceparent"] != caller  # a span of its own, marked not sampled
        assert sent["traceparent"].endswith("-00")
        with made.tracer.start_as_current_span("root"):
            assert len(telemetry.current_trace_id()) == 32  # a request's records still get one
            assert telemetry.current_trace_id() != "0" * 32
    finally:
        telemetry.release("unit-unexported", made)


def test_spans_are_recorded_once_the_provider_has_somewhere_to_send_them() -> None:
    made = telemetry.configure("unit-exported")
    try:
        exporter = InMemorySpanExporter()
        made.tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
        caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        parent = telemetry.extract_metadata([("traceparent", caller)])
        with made.tracer.start_as_current_span("call", context=parent) as span:
            assert span.is_recording()
        [finished] = exporter.get_finished_spans()
        assert finished.name == "call"
        assert (
            finished.parent is not None and format(finished.parent.span_id, "016x") == caller[36:52]
        )
        # A caller that decided not to sample is still honoured.
        unsampled = telemetry.extract_metadata([("traceparent", caller[:-2] + "00")])
        with made.tracer.start_as_current_span("skipped", context=unsampled) as span:
            assert not span.is_recording()
    finally:
        telemetry.release("unit-exported", made)
