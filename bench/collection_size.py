"""Latency of the data RPCs against an empty collection and one holding N rows, before and after the count fix.

Before bd78def's successor, every data RPC looked its collection up with `count(*)`, so Embed into a collection,
Search, Ingest and ListCollections slowed down as the collection grew; now collection rows are cached and no
data RPC counts. Both versions are measured in the same run, each in its own subprocess with `embedpool`
imported from its own tree (a git worktree of the revision, given this checkout's built `_native` extension:
the Rust side did not change) and its own embedded Postgres (their schemas differ: migration 0003 vs 0004).

Per version: `embedpool serve` as a separate process (as bench/serve.py starts it) on an embedded Postgres;
collections `empty` and `large` created over gRPC; `large` filled with --rows random unit vectors (dim 384) by
Store.upsert inside Store.bulk_load (HNSW index built once at the end), then VACUUM ANALYZE and CHECKPOINT so
that neither autovacuum nor the checkpoint of the load runs during the timings. One client, requests one at a
time. Every call is timed on `empty` before the load; after it, on `empty` and `large` alternating request by
request (so drift on the shared cores hits both alike):
- Embed: one new document (new id and text, so embedded and inserted), skip_vectors;
- Search: k=10, a short text query (embedded by the server);
- Ingest: one stream of one batch of 8 new documents, closed after its ack;
- ListCollections (it lists both): `empty` is its time before the load, `large` after;
- GetCollection (control): counts exactly, by design, in both versions.
`empty` grows by what the timings write into it (Embed and Ingest), a few thousand rows at most; the `empty`
figures before the load are kept too (`empty_before_load`), as a check on the phase's effect.
Correctness is recorded next to the timings: rows inserted per call, hits per search, the counts reported,
and the final exact count of `large`.

    .venv/bin/python -P bench/collection_size.py [--quick] [--rows N] [--before REV] [--after REV|.] [--out DIR]
    # 200k rows (--quick: 20k); --after . (default) is this working tree; writes DIR/collection_size.json, .png
    .venv/bin/python -P bench/collection_size.py --code LABEL [...]   # one version: the embedpool importable here
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `serve`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import asyncio
import contextlib
import json
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

DIM, K, LOAD_BATCH, INGEST_DOCS = 384, 10, 2000, 8
REPO = Path(_HERE).parent
RPCS = {
    "embed": "Embed 1 doc",
    "search": "Search k=10",
    "ingest": f"Ingest 1x{INGEST_DOCS}",
    "list": "ListCollections",
    "get": "GetCollection*",
}
QUERIES = [
    "how to read a file line by line",
    "sorting a list of tuples by the second item",
    "what does a context manager do",
    "parse command line arguments",
    "convert a string to a datetime",
    "retry a network request with backoff",
    "why is my regular expression slow",
    "merge two dictionaries",
]


# ---------------------------------------------------------------------------------------------------------------
# One version: runs under the embedpool that is importable (PYTHONPATH), labelled --code.


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "mean_ms": float(ms.mean()),
        "n": len(ms),
    }


async def load(uri: str, name: str, rows: int) -> dict[str, float]:
    """`rows` random unit vectors into `name` by Store.upsert inside Store.bulk_load (two writers, as the Ingest
    RPC stores), then VACUUM ANALYZE and CHECKPOINT. Seconds of each step."""
    import anyio
    import psycopg

    from embedpool.store import DocumentRow, Store

    rng = np.random.default_rng(0)
    starts = iter(range(0, rows, LOAD_BATCH))

    async def writer(store: Store) -> None:
        for start in starts:
            n = min(LOAD_BATCH, rows - start)
            vectors = rng.standard_normal((n, DIM)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            batch = [
                DocumentRow(f"r{start + j}", f"passage {start + j}", {"n": start + j}, str(start + j).encode(), v)
                for j, v in enumerate(vectors)
            ]
            await store.upsert(name, batch)

    store = await Store.open(uri)
    try:
        started = time.perf_counter()
        async with store.bulk_load(name) as bulk:
            assert bulk, "the collection was not empty"
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer, store)
                tg.start_soon(writer, store)
            written = time.perf_counter()
        built = time.perf_counter()
        assert (await store.stats(name)).indexed
    finally:
        await store.close()
    async with await psycopg.AsyncConnection.connect(uri, autocommit=True) as conn:
        await conn.execute("VACUUM (ANALYZE) documents")
        await conn.execute("CHECKPOINT")
    return {"write_s": written - started, "index_build_s": built - written, "vacuum_s": time.perf_counter() - built}


class Client:
    """The RPCs timed, each returning what its correctness check needs."""

    def __init__(self, stub: Any, pb: Any) -> None:
        self.stub, self.pb = stub, pb
        self.written = 0  # documents sent, for unique ids and texts

    def _docs(self, n: int, collection: str) -> list[Any]:
        docs = []
        for _ in range(n):
            self.written += 1
            text = f"note {self.written} for {collection}: a short document about python generators"
            docs.append(self.pb.Document(id=f"n{self.written}", text=text))
        return docs

    async def embed(self, collection: str) -> int:
        request = self.pb.EmbedRequest(documents=self._docs(1, collection), collection=collection, skip_vectors=True)
        return int((await self.stub.Embed(request)).upsert.inserted)

    async def search(self, collection: str) -> int:
        query = QUERIES[self.written % len(QUERIES)]
        self.written += 1
        return len((await self.stub.Search(self.pb.SearchRequest(collection=collection, text=query, k=K))).hits)

    async def ingest(self, collection: str) -> int:
        request = self.pb.IngestRequest(
            collection=collection, batch_id=1, documents=self._docs(INGEST_DOCS, collection)
        )
        return sum([ack.upsert.inserted async for ack in self.stub.Ingest(iter([request]))])

    async def list(self, collection: str) -> int:
        reply = await self.stub.ListCollections(self.pb.ListCollectionsRequest())
        return next(int(c.count) for c in reply.collections if c.name == collection)

    async def get(self, collection: str) -> int:
        return int((await self.stub.GetCollection(self.pb.GetCollectionRequest(name=collection))).count)


async def timed(
    calls: dict[str, Callable[[str], Awaitable[int]]], collections: tuple[str, ...], samples: int
) -> tuple[dict[str, dict[str, list[float]]], dict[str, dict[str, list[int]]]]:
    """Each call on each collection `samples` times, interleaved; seconds and the calls' answers."""
    seconds: dict[str, dict[str, list[float]]] = {rpc: {c: [] for c in collections} for rpc in calls}
    answers: dict[str, dict[str, list[int]]] = {rpc: {c: [] for c in collections} for rpc in calls}
    for i in range(samples):
        for rpc, call in calls.items():
            for collection in collections if i % 2 == 0 else collections[::-1]:
                started = time.perf_counter()
                answer = await call(collection)
                seconds[rpc][collection].append(time.perf_counter() - started)
                answers[rpc][collection].append(answer)
    return seconds, answers


async def measure(port: int, uri: str, rows: int, samples: int) -> dict[str, Any]:
    import grpc
    import psycopg

    from embedpool.v1 import embedpool_pb2 as pb
    from embedpool.v1 import embedpool_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        client = Client(pb_grpc.EmbedderStub(channel), pb)
        for name in ("empty", "large"):
            await client.stub.CreateCollection(pb.CreateCollectionRequest(name=name))
        calls = {"embed": client.embed, "search": client.search, "ingest": client.ingest, "list": client.list}
        calls["get"] = client.get
        warm = max(5, samples // 10)
        await timed(calls, ("empty",), warm)
        # Before the load: every call on `empty`, with `large` empty too (ListCollections' `empty` figure).
        unloaded, _ = await timed(calls, ("empty",), samples)
        loaded = await load(uri, "large", rows)
        await timed(calls, ("empty", "large"), warm)  # the large collection's pages into shared_buffers
        seconds, answers = await timed(calls, ("empty", "large"), samples)
        final = {
            name: int((await client.stub.GetCollection(pb.GetCollectionRequest(name=name))).count)
            for name in ("empty", "large")
        }
    # ListCollections lists both collections: its `empty` is the listing before `large` was loaded.
    seconds["list"]["empty"] = unloaded["list"]["empty"]
    async with await psycopg.AsyncConnection.connect(uri) as conn:
        schema = (await (await conn.execute("SELECT max(version) FROM schema_migrations")).fetchone() or [None])[0]

    written_large = sum(answers[rpc]["large"][i] for rpc in ("embed", "ingest") for i in range(samples))
    checks = {
        "embed_inserted_per_call": {c: float(np.mean(answers["embed"][c])) for c in ("empty", "large")},
        "ingest_inserted_per_stream": {c: float(np.mean(answers["ingest"][c])) for c in ("empty", "large")},
        "search_hits_per_query": {c: float(np.mean(answers["search"][c])) for c in ("empty", "large")},
        "list_count_large_last": answers["list"]["large"][-1],
        "get_count_large_last": answers["get"]["large"][-1],
        "final_count": final,
        "large_rows_loaded": rows,
        "large_final_count_ok": final["large"] == rows + written_large + warm * (1 + INGEST_DOCS),
        "schema_version": schema,
    }
    result = {rpc: {c: percentiles(s) for c, s in by_collection.items()} for rpc, by_collection in seconds.items()}
    for r in result.values():
        r["ratio_p50"] = r["large"]["p50_ms"] / r["empty"]["p50_ms"]
        r["ratio_p95"] = r["large"]["p95_ms"] / r["empty"]["p95_ms"]
    # The same calls on `empty` before the load: a drift check for the `empty` column of the other RPCs.
    before_load = {rpc: percentiles(by_collection["empty"]) for rpc, by_collection in unloaded.items()}
    return {"rpcs": result, "empty_before_load": before_load, "load": loaded, "checks": checks}


def run_one(args: argparse.Namespace) -> dict[str, Any]:
    from serve import start_server

    import embedpool
    from embedpool.config import Settings
    from embedpool.engine import pick_device, prepare
    from embedpool.store import EmbeddedPostgres

    code = Path(embedpool.__file__).resolve().parent.parent.parent
    server = argparse.Namespace(device=pick_device("auto"), variant="auto", server_arg=[])
    bundle = prepare(Settings())
    with tempfile.TemporaryDirectory(prefix="embedpool-bench-") as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        server.server_arg = ["--database-url", pg.uri]
        proc, port = start_server(server, bundle.root, Path(tmp) / "data")
        try:
            result = asyncio.run(measure(port, pg.uri, args.rows, args.samples))
        finally:
            proc.terminate()
            proc.wait(60)
    result["code"] = {"label": args.code, "tree": str(code), **revision(code)}
    result["params"] = {"rows": args.rows, "samples": args.samples, "device": server.device, "dim": DIM, "k": K}
    return result


# ---------------------------------------------------------------------------------------------------------------
# Both versions: each as a subprocess of this script with its own tree on PYTHONPATH; merged.


def git(*argv: str, cwd: Path = REPO) -> str:
    return subprocess.run(["git", *argv], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def revision(tree: Path) -> dict[str, Any]:
    try:
        return {"commit": git("rev-parse", "HEAD", cwd=tree), "dirty": bool(git("status", "--porcelain", cwd=tree))}
    except (subprocess.CalledProcessError, FileNotFoundError):
        return {"commit": None, "dirty": None}


@contextlib.contextmanager
def code_tree(rev: str) -> Iterator[Path]:
    """This checkout for ".", else a temporary git worktree of `rev` with this checkout's built extension."""
    if rev == ".":
        yield REPO
        return
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    with tempfile.TemporaryDirectory(prefix=f"embedpool-{commit[:8]}-") as tmp:
        tree = Path(tmp) / "tree"
        git("worktree", "add", "--detach", str(tree), commit)
        try:
            for native in (REPO / "python" / "embedpool").glob("_native*.so"):
                shutil.copy2(native, tree / "python" / "embedpool" / native.name)
            yield tree
        finally:
            git("worktree", "remove", "--force", str(tree))


def run_version(label: str, rev: str, args: argparse.Namespace) -> dict[str, Any]:
    with code_tree(rev) as tree:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tree / "python"), os.environ.get("PYTHONPATH", "")])}
        cmd = [sys.executable, "-P", __file__, "--code", label, "--rows", str(args.rows)]
        cmd += ["--samples", str(args.samples), "--out", str(args.out)]
        subprocess.run(cmd, env=env, check=True)
    result: dict[str, Any] = json.loads((args.out / f"collection_size.{label}.json").read_text())
    result["code"]["rev"] = rev
    return result


def version_name(label: str, code: dict[str, Any]) -> str:
    if not code["commit"]:
        return label
    return f"{label} {code['commit'][:8]}{'+dirty' if code['dirty'] else ''}"


def print_table(versions: dict[str, dict[str, Any]], stat: str) -> None:
    head = "".join(f"{version_name(label, v['code']):>30}" for label, v in versions.items())
    print(f"{stat:<18}{head}")
    print(f"{'ms':<18}" + f"{'empty':>10}{'large':>10}{'ratio':>10}" * len(versions))
    for rpc, title in RPCS.items():
        cells = ""
        for v in versions.values():
            r = v["rpcs"][rpc]
            cells += f"{r['empty'][stat]:>10.2f}{r['large'][stat]:>10.2f}{r['large'][stat] / r['empty'][stat]:>9.2f}x"
        print(f"{title:<18}{cells}")


def plot(versions: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    xs = np.arange(len(RPCS))
    bars = [(label, size) for label in versions for size in ("empty", "large")]
    width = 0.8 / len(bars)
    for n, (label, size) in enumerate(bars):
        p50 = [versions[label]["rpcs"][rpc][size]["p50_ms"] for rpc in RPCS]
        ax.bar(xs + (n - (len(bars) - 1) / 2) * width, p50, width, label=f"{label}, {size}")
    ax.set_xticks(xs, list(RPCS.values()))
    rows = next(iter(versions.values()))["params"]["rows"]
    ax.set(yscale="log", ylabel="p50 ms (log)", title=f"data RPC latency: empty collection vs {rows:,} rows")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k rows, fewer samples (about 3 minutes on 2 cores)")
    parser.add_argument("--rows", type=int, default=None, help="rows of the large collection (200k; --quick 20k)")
    parser.add_argument("--samples", type=int, default=None, help="timed calls per RPC and collection (200; 50)")
    parser.add_argument("--before", default="bd78def", help="revision before the fix")
    parser.add_argument("--after", default=".", help="revision after the fix; '.' = this working tree")
    parser.add_argument("--code", help="measure only the embedpool importable here, under this label")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out")
    args = parser.parse_args()
    args.rows = args.rows or (20_000 if args.quick else 200_000)
    args.samples = args.samples or (50 if args.quick else 200)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.code:
        result = run_one(args)
        (args.out / f"collection_size.{args.code}.json").write_text(json.dumps(result, indent=2) + "\n")
        print_table({args.code: result}, "p50_ms")
        return

    started = time.perf_counter()
    versions = {label: run_version(label, rev, args) for label, rev in (("before", args.before), ("after", args.after))}
    report = {
        "question": "does data-RPC latency grow with the collection (count(*) per request before the fix)?",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "params": {"rows": args.rows, "samples": args.samples, "dim": DIM, "k": K, "ingest_docs": INGEST_DOCS},
        "seconds": time.perf_counter() - started,
        "versions": versions,
        "ratio_p50": {label: {rpc: v["rpcs"][rpc]["ratio_p50"] for rpc in RPCS} for label, v in versions.items()},
    }
    (args.out / "collection_size.json").write_text(json.dumps(report, indent=2) + "\n")
    plot(versions, args.out / "collection_size.png")
    print(f"\nrows={args.rows} samples={args.samples} cpus={os.cpu_count()}  (* control: counts exactly by design)")
    print_table(versions, "p50_ms")
    print()
    print_table(versions, "p95_ms")
    for label, v in versions.items():
        c, ld = v["checks"], v["load"]
        print(
            f"{label}: schema {c['schema_version']}, load {ld['write_s']:.0f}s + index {ld['index_build_s']:.0f}s,"
            f" hits/search {c['search_hits_per_query']['large']:.1f}, listed {c['list_count_large_last']}"
            f" (exact {c['get_count_large_last']}), final count ok {c['large_final_count_ok']}"
        )
    print(
        f"wrote {args.out / 'collection_size.json'} and {args.out / 'collection_size.png'} in {report['seconds']:.0f}s"
    )


if __name__ == "__main__":
    main()
