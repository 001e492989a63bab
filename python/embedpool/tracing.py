"""OpenTelemetry traces: on only when the standard OTEL_* environment asks for export, and then a span per call
with a child span per stage. Off (the default), the hot paths check `enabled` and do no span work at all.

The SDK reads the rest of the standard environment itself: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES (the
resource), OTEL_TRACES_SAMPLER[_ARG] (the sampler), OTEL_EXPORTER_OTLP_* (where and how spans go) and OTEL_BSP_*
(batching).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

__all__ = [
    "configure",
    "enabled",
    "export_requested",
    "failed",
    "record",
    "recording",
    "server_span",
    "shutdown",
    "span",
    "wall_ns",
]

enabled = False
"""True once configure() turned the SDK on; read it as `tracing.enabled` (it changes at start-up)."""

SERVICE_NAME: Final = "embedpool"
_EXPORTERS: Final = ("otlp", "console")
_log = logging.getLogger(__name__)
_tracer: trace.Tracer = trace.NoOpTracer()
_shutdown: Callable[[], None] | None = None

wall_ns = time.time_ns
"""The clock spans are stamped with; stage times meant for `record` are taken with it."""


def export_requested(env: Mapping[str, str]) -> tuple[str, ...]:
    """The exporters the standard environment asks for: OTEL_TRACES_EXPORTER's known names, or otlp when only an
    OTLP endpoint is set; none when OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return ()
    named = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if named:
        unknown = sorted(set(named) - {*_EXPORTERS, "none"})
        if unknown:
            _log.warning("OTEL_TRACES_EXPORTER: %s not supported (only otlp, console, none)", ", ".join(unknown))
        return tuple(n for n in _EXPORTERS if n in named)
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ("otlp",)
    return ()


def configure(env: Mapping[str, str] | None = None) -> bool:
    """Turns tracing on for this process when the environment asks for export; whether it did. Once per process:
    OpenTelemetry's global tracer provider can be set only once."""
    global enabled, _tracer, _shutdown
    source = os.environ if env is None else env
    exporters = export_requested(source)
    if not exporters or enabled:
        return enabled
    # The SDK and exporter are imported here: a process without tracing does not load them.
    from opentelemetry.sdk.resources import SERVICE_NAME as SERVICE_NAME_KEY
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    # Resource.create reads OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES; without a name from them, ours.
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME_KEY, "")).startswith("unknown_service"):
        resource = Resource.create({SERVICE_NAME_KEY: SERVICE_NAME})
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    protocol = source.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or source.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    if "otlp" in exporters and protocol != "grpc":
        _log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: only grpc is supported; exporting over gRPC", protocol)
    for name in exporters:
        exporter: SpanExporter
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()
        else:
            exporter = ConsoleSpanExporter()
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("embedpool")
    _shutdown = provider.shutdown
    enabled = True
    _log.info("tracing on: exporting spans to %s", ", ".join(exporters))
    return True


def shutdown() -> None:
    """Flushes the spans not exported yet and stops the exporters (at the end of the server's run)."""
    global enabled, _shutdown
    if _shutdown is not None:
        enabled = False
        stop, _shutdown = _shutdown, None
        stop()


@contextlib.contextmanager
def server_span(
    name: str, carrier: Iterable[tuple[str, str | bytes]], attributes: Mapping[str, AttributeValue]
) -> Iterator[Span]:
    """The span of one incoming call, current inside the block, child of the caller's span when the call carries
    W3C trace context (`carrier`: its metadata or headers, names in lower case). The door sets its status."""
    headers = {k: v for k, v in carrier if isinstance(v, str) and k in ("traceparent", "tracestate")}
    parent = propagate.extract(headers) if headers else otel_context.Context()
    with _tracer.start_as_current_span(
        name,
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,  # an abort is how a handler answers; the door sets the status it answered
        set_status_on_exception=False,
    ) as current:
        yield current


def failed(current: Span, status: str) -> None:
    """Marks the span failed, with the call's status name as its description."""
    current.set_status(Status(StatusCode.ERROR, status))


@contextlib.contextmanager
def _span(name: str, attributes: Mapping[str, AttributeValue]) -> Iterator[None]:
    with _tracer.start_as_current_span(name, attributes=attributes):
        yield


def recording() -> bool:
    """Whether the current call is traced: tracing is on and the sampler kept the call's span (a call sampled out
    gets no child spans either, so a low sampling ratio costs next to nothing)."""
    return enabled and trace.get_current_span().is_recording()


def span(name: str, **attributes: AttributeValue) -> contextlib.AbstractContextManager[None]:
    """A child span of the current one around a block; nothing at all when the call is not traced."""
    if not recording():
        return contextlib.nullcontext()
    return _span(name, attributes)


def record(name: str, start_ns: int, end_ns: int, **attributes: AttributeValue) -> None:
    """A finished child span of the current one, for a stage timed elsewhere (on a worker thread, or in a batch
    that served several calls): stamped with its own times, so no context has to follow the work around."""
    _tracer.start_span(name, attributes=attributes, start_time=start_ns).end(end_time=max(start_ns, end_ns))
