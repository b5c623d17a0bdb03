"""Telemetry wiring: a slow or absent collector costs spans (counted), never requests."""

from __future__ import annotations

import time

import httpx

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
