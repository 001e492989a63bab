"""What the query cache buys Search by text: latency and throughput of a repeated-query workload, cache on vs off.

Two `embedpool serve` processes, identical but for --query-cache-bytes (64 MiB vs 0), share one embedded Postgres
and so one collection of --docs corpus passages (loaded once, through the cache-off server: writes do not use the
cache). Each round draws --searches Search calls (k=10) from --queries distinct short queries, Zipf-like (query
i of a random ranking is asked with weight 1/(i+1)^--zipf), and both arms run that same sequence from --clients
concurrent callers (closed loop), the arm going first alternating each round. Every round has queries of its own,
so the cache starts cold for them: the first asking of each query is a miss and the hit rate is what this workload
earns, not a warmed-up 100%.

Correctness next to timing: for every query, the hits of its first (missed) and later (cached) asking on the
cached arm are the same ids and scores; and both arms' hits for it are compared (same model and index: ids equal,
scores within float noise). The hit rate is the cached server's own, from its /metrics.

    .venv/bin/python -P bench/query_cache.py [--quick] [--docs N] [--queries Q] [--searches S] [--clients C]
        [--rounds R] [--zipf A] [--out DIR]
    # writes DIR/query_cache.json (default bench/results)

--on TARGET --on-metrics URL --off TARGET: use two servers already running on one database instead (the tests).
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `_chaos_server`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
from _chaos_server import ServerProcess
from prometheus_client.parser import text_string_to_metric_families

from embedpool.benchmark.corpus import passages
from embedpool.config import Settings
from embedpool.engine import prepare
from embedpool.store.embedded import running_postgres
from embedpool.v1 import embedpool_pb2 as pb
from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

K = 10
ARMS = ("on", "off")
CACHE_BYTES = 64 * 1024 * 1024
Answer = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class Arm:
    target: str
    metrics_url: str | None  # the cached arm's, for its hit and miss counters


class Agreement:
    """How the answers to one query agree: between its askings on each arm (on the cached arm, hits against the
    miss that filled the entry: the same vector, unless two callers missed at once), and between the arms' first."""

    def __init__(self) -> None:
        self.queries = 0
        self.ids_differ = {"on_repeats": 0, "off_repeats": 0, "on_vs_off": 0}
        self.max_score_diff = dict.fromkeys(self.ids_differ, 0.0)

    def _compare(self, what: str, a: Answer, b: Answer) -> None:
        self.ids_differ[what] += [i for i, _ in a] != [i for i, _ in b]
        diffs = [abs(x[1] - y[1]) for x, y in zip(a, b, strict=False)]
        self.max_score_diff[what] = max(self.max_score_diff[what], *diffs, 0.0)

    def add(self, on: dict[str, list[Answer]], off: dict[str, list[Answer]]) -> None:
        for query, answers in on.items():
            self.queries += 1
            for again in answers[1:]:
                self._compare("on_repeats", answers[0], again)
            for again in off[query][1:]:
                self._compare("off_repeats", off[query][0], again)
            self._compare("on_vs_off", answers[0], off[query][0])

    def report(self) -> dict[str, Any]:
        return {"queries": self.queries, "ids_differ": self.ids_differ, "max_score_diff": self.max_score_diff}


def zipf_sequence(queries: Sequence[str], n: int, exponent: float, seed: int) -> list[str]:
    """`n` draws from `queries`, the i-th of a random ranking with weight 1/(i+1)^exponent."""
    rng = np.random.default_rng(seed)
    ranked = rng.permutation(len(queries))
    weights = 1.0 / np.arange(1, len(queries) + 1) ** exponent
    picks = rng.choice(len(queries), size=n, p=weights / weights.sum())
    return [queries[ranked[p]] for p in picks]


def run_round(target: str, collection: str, sequence: list[str], clients: int) -> dict[str, Any]:
    """Closed loop: `clients` threads take the next search of `sequence` until it is done. Latency of each call
    by its position; the first answer of each query."""
    latencies = [0.0] * len(sequence)
    answers: dict[str, list[Answer]] = {}
    lock = threading.Lock()
    cursor = iter(range(len(sequence)))

    def client(stub: pb_grpc.EmbedderStub) -> None:
        while True:
            with lock:
                i = next(cursor, None)
            if i is None:
                return
            request = pb.SearchRequest(collection=collection, text=sequence[i], k=K)
            started = time.perf_counter()
            reply = stub.Search(request, timeout=60)
            latencies[i] = time.perf_counter() - started
            answer = tuple((hit.id, round(hit.score, 6)) for hit in reply.hits)
            with lock:
                answers.setdefault(sequence[i], []).append(answer)

    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(stub,)) for _ in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    if len(answers) != len(set(sequence)) or sum(map(len, answers.values())) != len(sequence):
        raise RuntimeError("a search failed")  # its thread printed why
    seen: set[str] = set()
    first_asked = []
    for query in sequence:  # the first asking of a query in sequence order: the cached arm's miss
        first_asked.append(query not in seen)
        seen.add(query)
    return {"elapsed_s": elapsed, "latencies": latencies, "first_asked": first_asked, "answers": answers}


def percentiles(latencies: Sequence[float]) -> dict[str, float | None]:
    flat = sorted(latencies)
    if not flat:
        return {"p50_ms": None, "p99_ms": None}
    return {
        "p50_ms": round(1000 * flat[len(flat) // 2], 3),
        "p99_ms": round(1000 * flat[min(len(flat) - 1, int(len(flat) * 0.99))], 3),
    }


def cache_counters(url: str) -> dict[str, float]:
    text = httpx.get(url, timeout=10).text
    wanted = {"embedpool_query_cache_hits_total", "embedpool_query_cache_misses_total"}
    wanted |= {"embedpool_query_cache_bytes", "embedpool_query_cache_entries"}
    found = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name in wanted}
    return {name.removeprefix("embedpool_query_cache_"): found.get(name, 0.0) for name in wanted}


def load_collection(target: str, collection: str, docs: list[str]) -> float:
    """The passages into a new collection, 128 per Embed call; seconds taken."""
    started = time.perf_counter()
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.EmbedderStub(channel)
        stub.CreateCollection(pb.CreateCollectionRequest(name=collection), timeout=60)
        for start in range(0, len(docs), 128):
            documents = [pb.Document(id=f"d{i}", text=docs[i]) for i in range(start, min(start + 128, len(docs)))]
            stub.Embed(pb.EmbedRequest(collection=collection, documents=documents, skip_vectors=True), timeout=300)
    return time.perf_counter() - started


@contextlib.contextmanager
def own_servers(root: Path) -> Iterator[dict[str, Arm]]:
    """Both arms' servers, started at once on one embedded Postgres."""
    model_dir = prepare(Settings()).root
    with running_postgres(root / "pg") as pg:
        servers: dict[str, ServerProcess] = {}
        errors: list[BaseException] = []

        def start(arm: str) -> None:
            try:
                cache = CACHE_BYTES if arm == "on" else 0
                servers[arm] = ServerProcess(
                    root / arm, model_dir, database_url=pg.uri, metrics_port=0, query_cache_bytes=cache
                )
            except BaseException as e:  # reported below, in the caller's thread
                errors.append(e)

        threads = [threading.Thread(target=start, args=(arm,)) for arm in ARMS]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        try:
            if errors:
                raise RuntimeError(f"a server failed to start: {errors[0]}") from errors[0]
            arms = {}
            for arm, server in servers.items():
                metrics_port = next(e["metrics_port"] for e in server.logged('"metrics_port"'))
                arms[arm] = Arm(server.target, f"http://127.0.0.1:{metrics_port}/metrics")
            yield arms
        finally:
            for server in servers.values():
                server.kill()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="500 docs, 50 queries, 400 searches, 2 rounds")
    parser.add_argument("--docs", type=int, default=0, help="passages in the collection (default 3000)")
    parser.add_argument("--queries", type=int, default=0, help="distinct queries per round (default 200)")
    parser.add_argument("--searches", type=int, default=0, help="searches per round and arm (default 2000)")
    parser.add_argument("--rounds", type=int, default=0, help="rounds, each arm once per round (default 4)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent callers")
    parser.add_argument("--zipf", type=float, default=1.0, help="exponent of the queries' popularity")
    parser.add_argument("--out", type=Path, default=Path(_HERE) / "results")
    parser.add_argument("--on", help="a running server with the cache (with --on-metrics and --off)")
    parser.add_argument("--on-metrics", help="its /metrics URL")
    parser.add_argument("--off", help="a running server without the cache, on the same database")
    args = parser.parse_args(argv)
    args.docs = args.docs or (500 if args.quick else 3000)
    args.queries = args.queries or (50 if args.quick else 200)
    args.searches = args.searches or (400 if args.quick else 2000)
    args.rounds = args.rounds or (2 if args.quick else 4)
    external = (args.on, args.on_metrics, args.off)
    if any(external) and not all(external):
        parser.error("--on, --on-metrics and --off go together")

    docs = passages(args.docs, max_words=80)
    pool = list(dict.fromkeys(passages(4 * args.queries * (args.rounds + 1), max_words=12, seed=1)))
    if len(pool) < args.queries * (args.rounds + 1):
        parser.error("the corpus has too few distinct short passages for that many queries and rounds")
    round_queries = [pool[r * args.queries : (r + 1) * args.queries] for r in range(args.rounds + 1)]
    warmup = round_queries.pop()  # asked of both arms before the rounds, never again
    collection = f"qcache_{uuid.uuid4().hex[:8]}"

    with contextlib.ExitStack() as stack:
        if args.on:
            arms = {"on": Arm(args.on, args.on_metrics), "off": Arm(args.off, None)}
        else:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-qcache-")))
            arms = stack.enter_context(own_servers(tmp))
        load_s = load_collection(arms["off"].target, collection, docs)
        print(f"{len(docs)} passages loaded in {load_s:.1f} s", flush=True)
        for arm in ARMS:
            run_round(arms[arm].target, collection, warmup, args.clients)
        on_metrics = arms["on"].metrics_url
        assert on_metrics is not None
        rounds: dict[str, list[dict[str, Any]]] = {arm: [] for arm in ARMS}
        agreement = Agreement()
        asked = 0  # distinct queries asked, over the rounds
        for r, queries in enumerate(round_queries):
            sequence = zipf_sequence(queries, args.searches, args.zipf, seed=r)
            asked += len(set(sequence))
            results = {}
            for arm in ARMS[r % 2 :] + ARMS[: r % 2]:  # each arm first in turn
                before = cache_counters(on_metrics)
                result = run_round(arms[arm].target, collection, sequence, args.clients)
                after = cache_counters(on_metrics)
                hits, misses = (
                    after["hits_total"] - before["hits_total"],
                    after["misses_total"] - before["misses_total"],
                )
                summary = {
                    **percentiles(result["latencies"]),
                    "searches": len(sequence),
                    "searches_per_s": round(len(sequence) / result["elapsed_s"], 1),
                    "hits": int(hits),
                    "misses": int(misses),
                    "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
                    "cache_bytes": int(after["bytes"]),
                    "cache_entries": int(after["entries"]),
                }
                rounds[arm].append({**summary, "_result": result})
                results[arm] = result
                print(
                    f"round {r + 1} {arm:>3}: {summary['searches_per_s']:8.1f} searches/s  p50 {summary['p50_ms']:7.2f}"
                    f" ms  p99 {summary['p99_ms']:7.2f} ms  hit rate {summary['hit_rate']:.3f}",
                    flush=True,
                )
            agreement.add(results["on"]["answers"], results["off"]["answers"])

    report = summarize(args, rounds, agreement, load_s, asked)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "query_cache.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out / 'query_cache.json'}")
    return report


def summarize(
    args: argparse.Namespace,
    rounds: dict[str, list[dict[str, Any]]],
    agreement: Agreement,
    load_s: float,
    asked: int,
) -> dict[str, Any]:
    """`asked`: distinct queries asked over the rounds, each a miss the first time."""
    arms = {}
    for arm in ARMS:
        runs = [r["_result"] for r in rounds[arm]]
        latencies = [x for run in runs for x in run["latencies"]]
        first = [x for run in runs for x, f in zip(run["latencies"], run["first_asked"], strict=True) if f]
        repeat = [x for run in runs for x, f in zip(run["latencies"], run["first_asked"], strict=True) if not f]
        arms[arm] = {
            **percentiles(latencies),
            "searches": len(latencies),
            "searches_per_s_median": statistics.median(r["searches_per_s"] for r in rounds[arm]),
            # The first asking of each query (a miss on the cached arm) and the repeats (hits there).
            "first_asked": percentiles(first),
            "repeated": percentiles(repeat),
        }
    on, off = arms["on"], arms["off"]
    hits = sum(r["hits"] for r in rounds["on"])
    misses = sum(r["misses"] for r in rounds["on"])
    ratios = {
        "p50_on_vs_off": round(on["p50_ms"] / off["p50_ms"], 3),
        "p99_on_vs_off": round(on["p99_ms"] / off["p99_ms"], 3),
        "throughput_on_vs_off": round(on["searches_per_s_median"] / off["searches_per_s_median"], 3),
    }
    print(f"\n{'arm':<5}{'searches/s (median)':>21}{'p50 ms':>9}{'p99 ms':>9}{'first p50':>11}{'repeat p50':>12}")
    for arm in ARMS:
        a = arms[arm]
        print(
            f"{arm:<5}{a['searches_per_s_median']:>21.1f}{a['p50_ms']:>9.2f}{a['p99_ms']:>9.2f}"
            f"{a['first_asked']['p50_ms']:>11.2f}{a['repeated']['p50_ms']:>12.2f}"
        )
    expected = 1 - asked / (args.searches * args.rounds)
    print(
        f"on/off: p50 {ratios['p50_on_vs_off']:.3f}x, p99 {ratios['p99_on_vs_off']:.3f}x, throughput"
        f" {ratios['throughput_on_vs_off']:.3f}x; hit rate {hits / max(1, hits + misses):.3f}"
        f" (at most {expected:.3f}: each query's first asking misses); answers: {agreement.report()}"
    )
    return {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {
            "cpus": os.cpu_count(),
            "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "workload": {
            "docs": args.docs,
            "load_s": round(load_s, 2),
            "distinct_queries_per_round": args.queries,
            "searches_per_round": args.searches,
            "rounds": args.rounds,
            "clients": args.clients,
            "zipf": args.zipf,
            "k": K,
        },
        "arms": arms,
        "rounds": {arm: [{k: v for k, v in r.items() if k != "_result"} for r in rounds[arm]] for arm in ARMS},
        "ratios": ratios,
        "cache": {
            "hits": hits,
            "misses": misses,
            "hit_rate": round(hits / (hits + misses), 4) if hits + misses else 0.0,
            "hit_rate_possible": round(expected, 4),
        },
        "correctness": agreement.report(),
    }


if __name__ == "__main__":
    main()
