"""What tracing costs: Embed throughput and latency of a server with tracing off against one with every call
traced (OTEL_TRACES_SAMPLER=always_on, spans exported over OTLP gRPC to a sink in this process), in the same run.

Two `embedpool serve` processes, identical but for the OTEL_* environment, take turns under the same closed-loop
load (--concurrency threads, each sending Embed requests of --docs corpus passages back to back, no collection),
--rounds rounds of --seconds per arm, the order alternating each round so drift on a shared machine hits both
arms alike. Correctness next to timing: every reply holds one vector per document, and the sink counts the spans
the traced server exported (each call: its RPC span, tokenize, queue wait, inference).

Tracing adds a fixed cost per call (its spans), so the defaults are query-sized calls (one passage of up to 20
words), where that cost is the largest share. --before DIR adds a third arm: the same server, tracing off, run from
a checkout made before tracing existed (e.g. `git archive 79e4488 python | tar -x -C DIR`, plus the built
python/embedpool/_native*.so), to tell whether the off arm costs anything.

    .venv/bin/python -P bench/tracing.py [--quick] [--rounds N] [--seconds S] [--concurrency C] [--docs D]
        [--words W] [--before DIR]
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `corpus` and `_chaos_server`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from _chaos_server import ServerProcess
from corpus import passages
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as collector_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as collector_grpc

from embedpool.config import Settings
from embedpool.engine import prepare
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

SPANS_PER_CALL = 4  # the RPC span, tokenize, queue wait, inference


class SpanSink(collector_grpc.TraceServiceServicer):
    """An OTLP trace receiver that only counts what it is sent."""

    def __init__(self) -> None:
        self.spans = 0
        self._lock = threading.Lock()

    def Export(  # the generated servicer's method name
        self, request: collector_pb.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> collector_pb.ExportTraceServiceResponse:
        n = sum(len(s.spans) for r in request.resource_spans for s in r.scope_spans)
        with self._lock:
            self.spans += n
        return collector_pb.ExportTraceServiceResponse()


def run_load(target: str, requests: list[pb.EmbedRequest], concurrency: int, seconds: float) -> dict[str, Any]:
    """Closed loop: `concurrency` threads sending requests back to back for `seconds`."""
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    wrong = [0] * concurrency
    stop_at = time.perf_counter() + seconds

    def worker(k: int, stub: pb_grpc.EmbedderStub) -> None:
        dim = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=60).dim
        i = k
        while time.perf_counter() < stop_at:
            request = requests[i % len(requests)]
            started = time.perf_counter()
            reply = stub.Embed(request, timeout=60)
            latencies[k].append(time.perf_counter() - started)
            wrong[k] += len(reply.vectors) != len(request.documents) or any(len(v) != 4 * dim for v in reply.vectors)
            i += concurrency

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        started = time.perf_counter()
        with futures.ThreadPoolExecutor(concurrency) as pool:
            for done in [pool.submit(worker, k, stub) for k in range(concurrency)]:
                done.result()  # a failed call ends the run
        elapsed = time.perf_counter() - started
    flat = sorted(x for per in latencies for x in per)
    calls = len(flat)
    docs = sum(len(requests[i % len(requests)].documents) for i in range(calls))  # same sizes in every request
    return {
        "calls": calls,
        "docs_per_s": round(docs / elapsed, 2),
        "p50_ms": round(1000 * flat[calls // 2], 3) if calls else None,
        "p99_ms": round(1000 * flat[min(calls - 1, int(calls * 0.99))], 3) if calls else None,
        "wrong_replies": sum(wrong),
        "latencies": flat,
    }


def _pooled(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    flat = sorted(x for r in rounds for x in r["latencies"])
    return {
        "calls": len(flat),
        "docs_per_s_median": round(statistics.median(r["docs_per_s"] for r in rounds), 2),
        "p50_ms": round(1000 * flat[len(flat) // 2], 3),
        "p99_ms": round(1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))], 3),
        "wrong_replies": sum(r["wrong_replies"] for r in rounds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 5 s per arm")
    parser.add_argument("--rounds", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=0.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--docs", type=int, default=1, help="documents per Embed request")
    parser.add_argument("--words", type=int, default=20, help="longest passage, in words")
    parser.add_argument("--out", type=Path, default=Path(_HERE) / "results")
    parser.add_argument(
        "--before",
        type=Path,
        help="a checkout of embedpool before tracing (its python/ folder is put first on the server's PYTHONPATH):"
        " a third arm, to tell whether the off arm costs anything",
    )
    args = parser.parse_args()
    args.rounds = args.rounds or (3 if args.quick else 6)
    args.seconds = args.seconds or (5.0 if args.quick else 15.0)

    texts = passages(2000, max_words=args.words)
    requests = [
        pb.EmbedRequest(documents=[pb.Document(text=texts[(i * args.docs + j) % len(texts)]) for j in range(args.docs)])
        for i in range(len(texts) // args.docs)
    ]
    model_dir = prepare(Settings()).root
    sink = SpanSink()
    receiver = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    collector_grpc.add_TraceServiceServicer_to_server(sink, receiver)  # type: ignore[no-untyped-call]
    sink_port = receiver.add_insecure_port("127.0.0.1:0")
    receiver.start()
    base_env = {k: "" for k in os.environ if k.startswith("OTEL_")}  # the off arm must not trace by accident
    envs = {
        "off": base_env,
        "on": {
            **base_env,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_SAMPLER": "always_on",
        },
    }
    if args.before:
        envs["before"] = {**base_env, "PYTHONPATH": str(args.before.resolve() / "python")}
    arms = list(envs)
    rounds: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="bench-tracing-") as tmp:
        servers = {arm: ServerProcess(Path(tmp) / arm, model_dir, env=envs[arm], log_level="info") for arm in arms}
        try:
            for arm in arms:  # warm-up: sessions, allocator, connections
                run_load(servers[arm].target, requests, args.concurrency, min(3.0, args.seconds))
            spans_before = sink.spans
            for r in range(args.rounds):
                for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:  # each arm first in turn
                    result = run_load(servers[arm].target, requests, args.concurrency, args.seconds)
                    rounds[arm].append(result)
                    print(
                        f"round {r + 1} {arm:>3}: {result['docs_per_s']:8.1f} docs/s  p50 {result['p50_ms']:7.2f} ms",
                        flush=True,
                    )
            for server in servers.values():
                server.terminate()  # the traced one flushes its last spans on the way out
            spans = sink.spans - spans_before
        finally:
            for server in servers.values():
                server.kill()
    receiver.stop(grace=None)

    pooled = {arm: _pooled(rounds[arm]) for arm in arms}
    off, on = pooled["off"], pooled["on"]
    ratios = {
        "throughput_on_vs_off": round(on["docs_per_s_median"] / off["docs_per_s_median"], 3),
        "p50_on_vs_off": round(on["p50_ms"] / off["p50_ms"], 3),
        "p99_on_vs_off": round(on["p99_ms"] / off["p99_ms"], 3),
        "p50_added_ms": round(on["p50_ms"] - off["p50_ms"], 3),
    }
    if "before" in pooled:
        before = pooled["before"]
        ratios["throughput_off_vs_before"] = round(off["docs_per_s_median"] / before["docs_per_s_median"], 3)
        ratios["p50_off_vs_before"] = round(off["p50_ms"] / before["p50_ms"], 3)
    correctness = {
        "wrong_replies": sum(p["wrong_replies"] for p in pooled.values()),
        "spans_exported": spans,
        "spans_expected_at_least": on["calls"] * SPANS_PER_CALL,
    }
    print(f"\n{'arm':<5}{'docs/s (median)':>17}{'p50 ms':>10}{'p99 ms':>10}{'calls':>8}")
    for arm in arms:
        p = pooled[arm]
        print(f"{arm:<5}{p['docs_per_s_median']:>17.1f}{p['p50_ms']:>10.2f}{p['p99_ms']:>10.2f}{p['calls']:>8}")
    print(
        f"on/off: throughput {ratios['throughput_on_vs_off']:.3f}x, p50 {ratios['p50_on_vs_off']:.3f}x"
        f" (+{ratios['p50_added_ms']:.2f} ms), p99 {ratios['p99_on_vs_off']:.3f}x;"
        f" spans exported {spans} (>= {correctness['spans_expected_at_least']} expected),"
        f" wrong replies {correctness['wrong_replies']}"
    )
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "arms": pooled,
        "rounds": {arm: [{k: v for k, v in r.items() if k != "latencies"} for r in rounds[arm]] for arm in arms},
        "ratios": ratios,
        "correctness": correctness,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tracing.json").write_text(json.dumps(report, indent=2) + "\n")
    if "before" in pooled:
        print(
            f"off/before: throughput {ratios['throughput_off_vs_before']:.3f}x, p50 {ratios['p50_off_vs_before']:.3f}x"
        )
    print(f"wrote {args.out / 'tracing.json'}")


if __name__ == "__main__":
    main()
