"""OpenTelemetry tracing, configured only by the standard ``OTEL_*`` variables (OTLP export).

Off by default and then free: no provider is installed and no span is created. When on, the
W3C ``traceparent`` travels in NATS message headers and HTTP headers, so one download is one
trace across the CLI, peers, the scheduler and storage. Span attributes follow the messaging
and HTTP conventions and never carry header values or credentials.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager, nullcontext
from typing import Any

from opentelemetry import context, propagate, trace

_enabled = False
TRACER = "swarmfly"


def enabled() -> bool:
    return _enabled


def setup(service: str, tracing: bool) -> Any:
    """Install an OTLP exporting provider for this process; returns its shutdown (which
    flushes), or None when tracing is off."""
    global _enabled
    if not tracing or _enabled:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": f"swarmfly-{service}"}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _enabled = True
    return provider.shutdown


def inject(headers: MutableMapping[str, str]) -> None:
    if _enabled:
        propagate.inject(headers)


def span(
    name: str,
    *,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    carrier: Mapping[str, str] | None = None,
) -> Any:
    """A span as the current one (a no-op context when tracing is off); ``carrier`` holds
    the remote parent's ``traceparent``."""
    if not _enabled:
        return nullcontext(None)
    return _span(name, kind, dict(attributes or {}), carrier)


@contextmanager
def _span(
    name: str, kind: trace.SpanKind, attributes: dict[str, Any], carrier: Mapping[str, str] | None
) -> Iterator[trace.Span]:
    parent = propagate.extract(dict(carrier)) if carrier else context.get_current()
    tracer = trace.get_tracer(TRACER)
    with tracer.start_as_current_span(
        name, context=parent, kind=kind, attributes=attributes
    ) as current:
        yield current


def set_attributes(current: Any, **attributes: Any) -> None:
    if current is not None:
        current.set_attributes(attributes)
