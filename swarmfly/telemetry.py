"""OpenTelemetry tracing, configured only by the standard ``OTEL_*`` variables (OTLP export).

Off by default and then free: no provider is installed and no span is created. When on, the
W3C ``traceparent`` travels in NATS message headers and HTTP headers, so one download is one
trace across the CLI, peers, the scheduler and storage. Span attributes follow the messaging
and HTTP conventions and never carry header values or credentials.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry import context, propagate, trace

from swarmfly.ids import redact_url

if TYPE_CHECKING:
    from swarmfly.config import Tracing

log = logging.getLogger(__name__)
_enabled = False
TRACER = "swarmfly"


def enabled() -> bool:
    return _enabled


def setup(service: str, tracing: Tracing | None) -> Any:
    """Install an exporting provider for this process; returns its shutdown (which flushes),
    or None when tracing is off.

    ``OTEL_TRACES_EXPORTER`` picks ``otlp`` (the default, OTLP over HTTP) or ``console``;
    ``OTEL_SERVICE_NAME`` wins over the default ``swarmfly-<service>``. The other ``OTEL_*``
    variables (endpoint, headers, sampler, batch sizes) are read by the SDK itself.
    """
    global _enabled
    if not tracing or _enabled:
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

    exporters: list[SpanExporter] = []
    for name in tracing.exporters:
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name in ("otlp", ""):
            exporters.append(_otlp_exporter(tracing.protocol))
        elif name != "none":
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console)", name)
    service_name = tracing.service_name or f"swarmfly-{service}"
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _enabled = True
    return provider.shutdown


def _otlp_exporter(protocol: str) -> Any:
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %s is not installed; exporting http/protobuf", protocol)
    return OTLPSpanExporter()


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


def url_attributes(url: str) -> dict[str, Any]:
    """HTTP client attributes of a request to ``url`` (semantic conventions), with any
    credentials in it redacted: a span must never carry a secret."""
    parts = urlsplit(url)
    attributes: dict[str, Any] = {"url.full": redact_url(url)}
    if parts.hostname:
        attributes["server.address"] = parts.hostname
    try:
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        port = None
    if port:
        attributes["server.port"] = port
    return attributes


def set_attributes(current: Any, **attributes: Any) -> None:
    if current is not None:
        current.set_attributes(attributes)
