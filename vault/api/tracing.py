"""OpenTelemetry tracing (extra ``otel``; off unless ``--otel-endpoint`` or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT``/``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set): one server
span per RPC, exported over OTLP/gRPC.

A span carries the method, the status code and the caller's trace context (W3C
``traceparent`` metadata) only: no request field, so no subject id, request id, collection
id, score or vector, and no peer address or credential (what a collector keeps is not the
vault's to decide).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import grpc

from vault.api.metrics import RpcObserver

SERVICE_NAME = "template-vault"
_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


class TracingUnavailable(Exception):
    """Tracing was asked for but the ``otel`` extra is not installed."""


def wanted(endpoint: str | None) -> bool:
    """Whether tracing is configured: an endpoint given, or OpenTelemetry's own variables
    (and not ``OTEL_SDK_DISABLED=true``)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return bool(endpoint) or any(os.environ.get(v) for v in _ENDPOINT_VARS)


def provider(endpoint: str | None, exporter: Any = None) -> Any:
    """A TracerProvider exporting to ``endpoint`` (else where OTEL_* variables say), or
    to ``exporter`` (tests: the SDK's InMemorySpanExporter, synchronously)."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        raise TracingUnavailable("tracing needs the extra otel: pip install 'vault[otel]'") from None
    traced = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if exporter is not None:
        traced.add_span_processor(SimpleSpanProcessor(exporter))
        return traced
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise TracingUnavailable("tracing needs the extra otel: pip install 'vault[otel]'") from None
    traced.add_span_processor(BatchSpanProcessor(
        OTLPSpanExporter(endpoint=endpoint) if endpoint else OTLPSpanExporter()))
    return traced


def interceptor(traced: Any) -> grpc.ServerInterceptor:
    """A server span per RPC from ``traced`` (a TracerProvider)."""
    from opentelemetry import propagate, trace

    tracer = traced.get_tracer("vault.api")

    def begin(method: str, details: grpc.HandlerCallDetails
              ) -> Callable[[grpc.StatusCode], None]:
        service, _, name = method.lstrip("/").rpartition("/")
        carrier = {k: v for k, v in (details.invocation_metadata or ())
                   if k in ("traceparent", "tracestate") and isinstance(v, str)}
        span = tracer.start_span(method.lstrip("/"), context=propagate.extract(carrier),
                                 kind=trace.SpanKind.SERVER,
                                 attributes={"rpc.system": "grpc", "rpc.service": service,
                                             "rpc.method": name})

        def end(code: grpc.StatusCode) -> None:
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            if code != grpc.StatusCode.OK:
                span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
            span.end()

        return end

    return RpcObserver(begin)
