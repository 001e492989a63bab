"""Search latency under a saturating bulk load, with the pool's priority classes on and off (pool.priority).

    python bench/priority.py [--quick] [--streams N] [--rounds R] [--out DIR]

Two real servers, each `embedpool serve` in a process of its own (bench/_priority_server.py) on one embedded
Postgres: one with priority classes on, one with them off (one queue for all work: the baseline). For each, in
rounds that alternate which goes first (the box is noisy):
- idle: a prober sends Search by text (one call at a time, 10 ms apart) and nothing else runs;
- bulk: N Ingest streams (another process, so the load generator does not share the prober's GIL) send batches of
  passages as fast as the server acknowledges them (8 in flight each), re-sending ids with new text so every
  document is embedded;
  after a warm-up, without the prober, the server's mean inference time over a few batches is read from its
  /metrics (the bulk batch a query may wait behind); then the prober runs while the bulk load goes on, its calls
  spread by a random share of that batch time (see `probe`). Bulk docs/s
  are the documents the server embedded in the prober's window, less the queries: what priority costs bulk work.
The goal (the issue's): Search p99 under bulk with priority on <= 2 x idle p99 + one batch's inference time.
Prints a table, writes DIR/priority.json and DIR/priority.png (latency quantiles per arm).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `corpus`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import asyncio
import dataclasses
import json
import multiprocessing
import platform
import random
import re
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from multiprocessing.synchronize import Event as ProcessEvent
from pathlib import Path
from typing import Any

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # not gRPC's notes on the loader processes' forks

import grpc
import httpx
import numpy as np
from corpus import passages

from embedpool.config import Settings
from embedpool.engine import prepare
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

ARMS = ("on", "off")
PROBE_GAP_S = 0.01
IDS_PER_STREAM_BATCHES = 16  # ids cycle, so the bulk collections stay this many batches per stream
PREFILL_BATCH = 64  # documents per Ingest batch of the probes' collection
_READY_TIMEOUT_S = 180


@dataclass(frozen=True)
class Phases:
    rounds: int
    idle_s: float
    warm_s: float
    bulk_s: float
    probe_documents: int
    warm_batches: int  # batches of bulk alone timed, after warm_s
    batch_documents: int  # per Ingest batch of the bulk load
    # Ingest batches in flight per stream: enough that the store's pauses do not drain the queue. An arm ends by
    # waiting for them, so quick runs keep fewer and smaller ones (on a slow CPU a full window is half a minute).
    stream_window: int


QUICK = Phases(
    rounds=1,
    idle_s=2.0,
    warm_s=1.0,
    bulk_s=4.0,
    probe_documents=32,
    warm_batches=1,
    batch_documents=16,
    stream_window=3,
)
FULL = Phases(
    rounds=3,
    idle_s=10.0,
    warm_s=3.0,
    bulk_s=20.0,
    probe_documents=1024,
    warm_batches=4,
    batch_documents=64,
    stream_window=8,
)


class Server:
    """bench/_priority_server.py with priority classes `mode` ("on"/"off"); stopped with SIGTERM on close."""

    def __init__(self, mode: str, settings: dict[str, Any]) -> None:
        script = Path(_HERE) / "_priority_server.py"
        self.mode = mode
        # -P: bench/ is not put first on sys.path, where bench/tokenize.py would shadow the stdlib's
        command = [sys.executable, "-P", str(script), mode, json.dumps(settings)]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {mode} server exited with {self.proc.wait(_READY_TIMEOUT_S)}")
        ready = json.loads(line)
        self.port, self.metrics_port, self.database_url = ready["port"], ready["metrics_port"], ready["database_url"]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def counters(self) -> tuple[float, float, float]:
        """(seconds, batches, documents) the engine has spent and embedded so far, from /metrics."""
        text = httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10).text
        found: dict[str, float] = {}
        for name, value in re.findall(r"^embedpool_(\w+)(?:\{[^}]*\})? (\S+)$", text, re.MULTILINE):
            found[name] = found.get(name, 0.0) + float(value)  # summed over the models' labels
        return (
            found["inference_duration_seconds_sum"],
            found["inference_duration_seconds_count"],
            found["documents_total"],
        )

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _batch(stream: int, b: int, texts: list[str], collection: str, size: int) -> pb.IngestRequest:
    first = (stream * 7919 + b * size) % len(texts)
    documents = [
        pb.Document(
            id=f"s{stream}-{(b * size + i) % (IDS_PER_STREAM_BATCHES * size)}",
            text=f"{b} {texts[(first + i) % len(texts)]}",  # new text each time: embedded, never skipped as unchanged
        )
        for i in range(size)
    ]
    return pb.IngestRequest(collection=collection if b == 0 else "", batch_id=b, documents=documents)


async def _ingest_streams(
    target: str,
    collection: str,
    streams: int,
    texts: list[str],
    phases: Phases,
    stop: ProcessEvent,
    out: multiprocessing.Queue[Any],
    acknowledged: list[int],
) -> None:
    stopping = asyncio.Event()

    async def stream(s: int) -> None:
        window = asyncio.Semaphore(phases.stream_window)

        async def requests() -> Any:
            b = 0
            while not stopping.is_set():
                await window.acquire()
                yield _batch(s, b, texts, collection, phases.batch_documents)
                b += 1

        async for ack in stub.Ingest(requests()):
            if not acknowledged:
                out.put("acknowledged")  # the load is on
            acknowledged.append(len(ack.ids))
            window.release()

    async def watch() -> None:
        while not stop.is_set():
            await asyncio.sleep(0.05)
        stopping.set()

    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        await asyncio.gather(watch(), *(stream(s) for s in range(streams)))


def bulk_load(
    target: str,
    collection: str,
    streams: int,
    texts: list[str],
    phases: Phases,
    stop: ProcessEvent,
    out: multiprocessing.Queue[Any],
) -> None:
    """In its own process: Ingest streams until `stop`. Puts "acknowledged" on `out` at the first acknowledgement,
    and at the end the documents acknowledged in all."""
    acknowledged: list[int] = []
    asyncio.run(_ingest_streams(target, collection, streams, texts, phases, stop, out, acknowledged))
    out.put(sum(acknowledged))


async def probe(target: str, collection: str, queries: list[str], seconds: float, spread_s: float = 0.0) -> list[float]:
    """Search by text, one call at a time, for `seconds`: each call's latency (s). Calls are PROBE_GAP_S apart,
    plus a random share of `spread_s`: under bulk load, one batch's time, so that calls arrive at any point of the
    bulk batch running rather than, each right after the last, just as the next one starts (always its worst)."""
    rng = random.Random(0)
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        await stub.Search(pb.SearchRequest(collection=collection, text=queries[0], k=10))  # the channel is up
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            started = time.perf_counter()
            await stub.Search(pb.SearchRequest(collection=collection, text=queries[i % len(queries)], k=10))
            latencies.append(time.perf_counter() - started)
            i += 1
            await asyncio.sleep(PROBE_GAP_S + rng.uniform(0.0, spread_s))
    return latencies


def under_bulk(
    server: Server, streams: int, phases: Phases, texts: list[str], queries: list[str], probe_collection: str
) -> dict[str, Any]:
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    out: multiprocessing.Queue[Any] = context.Queue()
    loader = context.Process(
        target=bulk_load, args=(server.target, f"bulk_{server.mode}", streams, texts, phases, stop, out)
    )
    loader.start()
    try:
        assert out.get(timeout=_READY_TIMEOUT_S) == "acknowledged"
        time.sleep(phases.warm_s)  # the streams fill the queue
        # Bulk alone for a few batches: the engine's time per bulk batch, what a query may wait behind.
        seconds0, batches0, _ = server.counters()
        while (now := server.counters())[1] < batches0 + phases.warm_batches:
            time.sleep(0.1)
        seconds1, batches1, documents0 = now
        started = time.monotonic()
        batch_s = (seconds1 - seconds0) / (batches1 - batches0)
        latencies = asyncio.run(probe(server.target, probe_collection, queries, phases.bulk_s, batch_s))
        ended = time.monotonic()
        documents1 = server.counters()[2]
    finally:
        stop.set()
        out.get(timeout=_READY_TIMEOUT_S)
        loader.join(60)
    return {
        "latencies": latencies,
        "bulk_docs_per_s": (documents1 - documents0 - len(latencies) - 1) / (ended - started),
        "batch_inference_s": batch_s,
    }


def quantiles(latencies: list[float]) -> dict[str, float]:
    p50, p99 = np.quantile(latencies, [0.5, 0.99]) * 1000
    return {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2), "calls": len(latencies)}


def prefill(target: str, collection: str, texts: list[str]) -> None:
    """The probes' collection, written once through Ingest (both servers share the database)."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(name=collection))
        for mode in ARMS:
            stub.CreateCollection(pb.CreateCollectionRequest(name=f"bulk_{mode}"))
        batches = [
            pb.IngestRequest(
                collection=collection if b == 0 else "",
                batch_id=b,
                documents=[pb.Document(id=f"p{b}-{i}", text=t) for i, t in enumerate(texts[b : b + PREFILL_BATCH])],
            )
            for b in range(0, len(texts), PREFILL_BATCH)
        ]
        for ack in stub.Ingest(iter(batches), timeout=600):
            assert not ack.rejected


def run(args: argparse.Namespace, phases: Phases, work: Path) -> dict[str, Any]:
    model = str(prepare(Settings()).root)
    common = {"port": 0, "metrics_port": 0, "http_port": -1, "model": model, "log_level": "warning"}
    servers: dict[str, Server] = {}
    try:
        servers["on"] = Server("on", {**common, "data_dir": str(work / "on")})
        servers["off"] = Server(
            "off", {**common, "data_dir": str(work / "off"), "database_url": servers["on"].database_url}
        )
        texts = passages(4000)  # about 2,100 passages of 8-200 words (the corpus runs out)
        queries = [" ".join(t.split()[:8]) for t in texts[:200]]
        prefill(servers["on"].target, "probe", texts[-phases.probe_documents :])
        rounds: list[dict[str, Any]] = []
        for r in range(phases.rounds):
            order = ARMS if r % 2 == 0 else ARMS[::-1]
            for mode in order:
                server = servers[mode]
                idle = asyncio.run(probe(server.target, "probe", queries, phases.idle_s))
                bulk = under_bulk(server, args.streams, phases, texts, queries, "probe")
                rounds.append({"round": r, "mode": mode, "idle": idle, **bulk})
                print(
                    f"round {r} priority {mode:>3}: idle {quantiles(idle)['p99_ms']:7.1f} ms p99, under bulk "
                    f"{quantiles(bulk['latencies'])['p99_ms']:7.1f} ms p99, bulk {bulk['bulk_docs_per_s']:6.1f} docs/s",
                    flush=True,
                )
    finally:
        for server in reversed(servers.values()):  # the one owning the embedded Postgres last
            server.close()
    return summarize(args, phases, rounds)


def summarize(args: argparse.Namespace, phases: Phases, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    idle = quantiles([x for r in rounds for x in r["idle"]])
    batch_s = float(np.median([r["batch_inference_s"] for r in rounds]))
    arms: dict[str, Any] = {}
    for mode in ARMS:
        mine = [r for r in rounds if r["mode"] == mode]
        arms[mode] = {
            **quantiles([x for r in mine for x in r["latencies"]]),
            "bulk_docs_per_s": round(float(np.mean([r["bulk_docs_per_s"] for r in mine])), 1),
            "batch_inference_ms": round(float(np.median([r["batch_inference_s"] for r in mine])) * 1000, 1),
        }
    limit_ms = 2 * idle["p99_ms"] + batch_s * 1000
    per_round = [round_summary(r) for r in rounds]
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {
            "quick": args.quick,
            "streams": args.streams,
            "probe_gap_ms": PROBE_GAP_S * 1000,
            "probe_gap_under_bulk": "probe_gap_ms + uniform(0, one batch's inference)",
            **{k: v for k, v in vars(phases).items()},
        },
        "idle": idle,
        "batch_inference_ms": round(batch_s * 1000, 1),
        "under_bulk": arms,
        "goal": {
            "rule": "Search p99 under bulk, priority on <= 2 x idle p99 + one batch's inference time",
            "limit_ms": round(limit_ms, 1),
            "p99_on_ms": arms["on"]["p99_ms"],
            "met": arms["on"]["p99_ms"] <= limit_ms,
            # Each round against its own idle p99 and batch time: the box's load moves all three together.
            "met_in_rounds": sum(r["goal"]["met"] for r in per_round if "goal" in r),
            "rounds": phases.rounds,
        },
        "ratios": {
            "p99_off_vs_on": round(arms["off"]["p99_ms"] / arms["on"]["p99_ms"], 2),
            "p50_off_vs_on": round(arms["off"]["p50_ms"] / arms["on"]["p50_ms"], 2),
            "bulk_docs_on_vs_off": round(arms["on"]["bulk_docs_per_s"] / max(arms["off"]["bulk_docs_per_s"], 1e-9), 3),
        },
        "rounds": per_round,
    }


def round_summary(r: dict[str, Any]) -> dict[str, Any]:
    """One arm of one round; an "on" arm with the goal judged against that round's own idle p99 and batch time."""
    summary: dict[str, Any] = {
        "round": r["round"],
        "mode": r["mode"],
        "idle": quantiles(r["idle"]),
        "under_bulk": quantiles(r["latencies"]),
        "bulk_docs_per_s": round(r["bulk_docs_per_s"], 1),
        "batch_inference_ms": round(r["batch_inference_s"] * 1000, 1),
    }
    if r["mode"] == "on":
        limit_ms = 2 * summary["idle"]["p99_ms"] + summary["batch_inference_ms"]
        summary["goal"] = {"limit_ms": round(limit_ms, 1), "met": summary["under_bulk"]["p99_ms"] <= limit_ms}
    return summary


def table(result: dict[str, Any]) -> str:
    idle, arms, goal = result["idle"], result["under_bulk"], result["goal"]
    lines = [
        f"{'Search by text':<24}{'p50 ms':>10}{'p99 ms':>10}{'calls':>8}{'bulk docs/s':>13}",
        f"{'idle':<24}{idle['p50_ms']:>10.1f}{idle['p99_ms']:>10.1f}{idle['calls']:>8}{'':>13}",
    ]
    for mode in ("off", "on"):
        a = arms[mode]
        lines.append(
            f"{'under bulk, priority ' + mode:<24}{a['p50_ms']:>10.1f}{a['p99_ms']:>10.1f}{a['calls']:>8}"
            f"{a['bulk_docs_per_s']:>13.1f}"
        )
    lines.append(f"one batch's inference: {result['batch_inference_ms']:.1f} ms (mean, bulk alone)")
    lines.append(
        f"goal: p99 on {goal['p99_on_ms']:.1f} ms <= 2 x idle p99 + one batch = {goal['limit_ms']:.1f} ms:"
        f" {'met' if goal['met'] else 'NOT met'} (pooled), met in {goal['met_in_rounds']} of {goal['rounds']} rounds"
        f" (each against its own idle p99 and batch); p99 off/on {result['ratios']['p99_off_vs_on']}x,"
        f" bulk docs/s on/off {result['ratios']['bulk_docs_on_vs_off']}"
    )
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["idle", "bulk, priority off", "bulk, priority on"]
    values = [result["idle"], result["under_bulk"]["off"], result["under_bulk"]["on"]]
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(x - 0.2, [v["p50_ms"] for v in values], 0.4, label="p50")
    ax.bar(x + 0.2, [v["p99_ms"] for v in values], 0.4, label="p99")
    ax.axhline(result["goal"]["limit_ms"], color="black", linestyle="--", linewidth=1, label="goal (p99, on)")
    ax.set_xticks(x, names)
    ax.set_yscale("log")
    ax.set_ylabel("Search by text latency (ms, log)")
    ax.set_title(f"Search under {result['config']['streams']} Ingest streams, {result['machine']['cpus']} cores")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one short round (under a minute)")
    parser.add_argument("--streams", type=int, default=4, help="concurrent Ingest streams of the bulk load")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of both arms (default 3, quick 1)")
    parser.add_argument("--out", type=Path, default=Path(_HERE) / "results")
    args = parser.parse_args()
    phases = QUICK if args.quick else FULL
    if args.rounds is not None:
        phases = dataclasses.replace(phases, rounds=args.rounds)
    with tempfile.TemporaryDirectory(prefix="embedpool-priority-") as work:
        result = run(args, phases, Path(work))
    print(table(result))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "priority.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "priority.png")


if __name__ == "__main__":
    main()
