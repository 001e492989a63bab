"""W3C trace context on outgoing calls: a call made inside the caller's OpenTelemetry span carries its
`traceparent` (and `tracestate`), so the server's spans join the caller's trace."""

from __future__ import annotations

from typing import Any, TypeVar

from opentelemetry import propagate, trace

Stub = TypeVar("Stub")


def with_trace_context(stub: Stub) -> Stub:
    """`stub` itself when no span is current (an application without OpenTelemetry pays this one check); else a
    view of it whose calls send the current trace context as metadata."""
    if not trace.get_current_span().get_span_context().is_valid:
        return stub
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    if not carrier:
        return stub
    view: Any = _WithMetadata(stub, tuple(carrier.items()))
    return view  # type: ignore[no-any-return]  # same methods as `stub`, as far as its callers can tell


class _WithMetadata:
    __slots__ = ("_metadata", "_stub")

    def __init__(self, stub: object, metadata: tuple[tuple[str, str], ...]) -> None:
        self._stub = stub
        self._metadata = metadata

    def __getattr__(self, method: str) -> _Call:
        return _Call(getattr(self._stub, method), self._metadata)


class _Call:
    __slots__ = ("_metadata", "_multicallable")

    def __init__(self, multicallable: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._multicallable = multicallable
        self._metadata = metadata

    def __call__(self, request: Any, *, timeout: float | None = None) -> Any:
        return self._multicallable(request, timeout=timeout, metadata=self._metadata)
