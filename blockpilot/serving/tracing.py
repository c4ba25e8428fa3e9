"""OpenTelemetry tracing of the services: one trace per request across gateway -> verifier ->
policy / drafter.

- Every service process gets an SDK TracerProvider, so requests have trace ids (for the log lines
  and the `x-trace-id` the caller sees) even when nothing is exported.
- Export is off by default: `otlp_endpoint` (a service config field) sends spans to an OTLP/gRPC
  collector (Jaeger, the OpenTelemetry Collector); `trace_file` appends them as JSON lines to a
  file. The SDK's own OTEL_* variables still apply: OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES,
  OTEL_TRACES_SAMPLER(_ARG), OTEL_SDK_DISABLED, and OTEL_EXPORTER_OTLP_* (headers, certificates,
  timeout, compression) for the OTLP exporter.
- gRPC servers get the instrumentation's server interceptor (server_interceptor()); every gRPC
  channel the process opens afterwards (grpc.*channel and grpc.aio.*channel, so also those of
  blockpilot.client, which stays free of OpenTelemetry) gets the client instrumentation, which
  puts the W3C trace context into the call's metadata. Health checks and reflection are not
  traced (orchestrators poll them every few seconds).
- The gateway's Starlette app is wrapped by asgi_app(): the ASGI instrumentation's server span
  (the trace context of an incoming `traceparent` header continues) and `x-trace-id` in every
  traced response.
"""

from __future__ import annotations

import logging
import os

import grpc
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import (GrpcAioInstrumentorClient, GrpcInstrumentorClient,
                                                aio_server_interceptor, filters)
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

# gRPC trailing metadata of Generate and HTTP response header of the gateway.
TRACE_ID_KEY = "x-trace-id"

# Calls that are not a request's work: polled health checks, reflection, and the OTLP exporter's
# own Export calls (tracing those would trace the tracing).
_UNTRACED = filters.negate(filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection."),
                                          filters.service_prefix("opentelemetry.proto.")))


def setup_tracing(service: str, otlp_endpoint: str = "", trace_file: str = "") -> TracerProvider:
    """Install this process's TracerProvider (service name `blockpilot-<service>` unless
    OTEL_SERVICE_NAME says otherwise), its exporters, and the gRPC client instrumentation.
    Call once per process, before it opens gRPC channels."""
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or f"blockpilot-{service}"})
    provider = TracerProvider(resource=resource)
    if otlp_endpoint:
        # Imported here: the exporter (and its protobuf messages) loads only where it is used.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # Batched off the request path; the provider flushes what is left at exit.
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    if trace_file:
        out = open(os.path.expanduser(trace_file), "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
        # One span per line, written as each span ends (a reader sees it without a flush at exit).
        provider.add_span_processor(SimpleSpanProcessor(
            ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")))
    trace.set_tracer_provider(provider)
    GrpcInstrumentorClient(filter_=_UNTRACED).instrument(tracer_provider=provider)
    GrpcAioInstrumentorClient(filter_=_UNTRACED).instrument(tracer_provider=provider)
    return provider


def server_interceptor(provider: TracerProvider) -> grpc.aio.ServerInterceptor:
    """The gRPC server interceptor that opens a server span per call (continuing the caller's trace)."""
    return aio_server_interceptor(tracer_provider=provider, filter_=_UNTRACED)


def current_trace_id() -> str:
    """The trace id of the current span, as 32 hex digits ('' outside a trace)."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else ""


class TraceIdFilter(logging.Filter):
    """Gives every log record a `trace` attribute: ' trace_id=<id>' inside a traced request, else ''."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace_id = current_trace_id()
        record.trace = f" trace_id={trace_id}" if trace_id else ""
        return True


class _TraceIdHeader:
    """ASGI middleware (inside the ASGI instrumentation's span) that adds x-trace-id to the response."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        trace_id = current_trace_id() if scope["type"] == "http" else ""
        if not trace_id:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), (TRACE_ID_KEY.encode(), trace_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def asgi_app(app, provider: TracerProvider):
    """`app` with a server span per HTTP request (not for /health and /metrics, which are polled)
    and x-trace-id in its responses."""
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    # exclude_spans: no child span per ASGI send/receive message (one per SSE chunk otherwise).
    return OpenTelemetryMiddleware(_TraceIdHeader(app), excluded_urls="/health,/metrics", tracer_provider=provider,
                                   exclude_spans=["receive", "send"])
