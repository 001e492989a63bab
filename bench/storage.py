"""Storage types of a collection side by side: recall@10 against exact float32 search, bytes per vector and
Search latency, on the same real documents; and the wire encodings' bytes per vector and error.

One in-process `embedpool` server (gRPC on loopback, embedded Postgres, the default model). Passages of the
standard library's docstrings (bench/corpus.py) are embedded once through the server (Client.embed); the
queries are held-out passages (the ones after the documents), embedded the same way. Each storage choice gets
its own collection, created over gRPC and loaded with those same vectors through the store (Store.upsert in
bulk_load, so each HNSW index is built once over all rows), then VACUUM ANALYZE:
- float32: `vector` (the baseline: the storage of every collection before 0007);
- float16: a `halfvec` column, exact rerank on the stored half-precision values;
- binary: `bit(dim)` with a Hamming HNSW index plus the float32 vector for the exact rerank, at its default
  candidates (400 for k=10: store.search.BINARY_OVERSAMPLE times the others') and at --binary-candidates
  (default 100, the other storages' default);
- matryoshka: only with --matryoshka-dims D (float32 at D dimensions, cut and normalised again). The default
  MiniLM is not trained for truncation, so its figure says what cutting costs an untrained model, nothing more.
The reference is numpy's exact top 10 over the float32 document vectors. Search latency: one client, vector
queries, the arms alternated query by query (the box is shared and noisy), p50 and p90 per arm. Bytes per
vector: the average pg_column_size of the vector columns each storage keeps (binary counts the float32 kept
for the rerank), plus the HNSW index and whole partition (heap, TOAST, keys; documents' text included) per row.

    .venv/bin/python -P bench/storage.py [--quick] [--docs N] [--queries Q] [--matryoshka-dims D] [--out DIR]
    # 4000 docs / 200 queries (--quick: 1500 / 40); writes DIR/storage.json (default bench/results)
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last, for `corpus`.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import dataclasses
import functools
import json
import platform
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import corpus
import numpy as np
from anyio.from_thread import start_blocking_portal
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql

from embedpool.client import Client
from embedpool.config import Settings
from embedpool.service import encodings
from embedpool.store import DocumentRow, Store, search

K = 10
REPO = Path(_HERE).parent


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str
    storage: str
    dim: int
    candidates: int | None = None


@dataclasses.dataclass(frozen=True)
class Target:
    address: str
    database_url: str


@contextmanager
def server(args: argparse.Namespace) -> Iterator[Target]:
    """The server to measure: the one --server names, else one started here on a fresh data dir."""
    if args.server:
        yield Target(args.server, args.database_url)
        return

    with tempfile.TemporaryDirectory(prefix="embedpool-storage-") as tmp, started(Path(tmp), args) as running:
        yield Target(f"127.0.0.1:{running.port}", running.database_url)


@contextmanager
def started(data_dir: Path, args: argparse.Namespace) -> Iterator[Any]:
    from embedpool.engine import prepare
    from embedpool.server.app import serve

    matryoshka = args.matryoshka_dims
    settings = Settings(
        port=0,
        metrics_port=0,
        http_port=0,
        data_dir=data_dir,
        model=str(prepare(Settings()).root),
        matryoshka_dims=(matryoshka,) if matryoshka else (),
        log_level="warning",
    )
    with start_blocking_portal(backend="asyncio") as portal:
        future, running = portal.start_task(functools.partial(serve), settings)
        try:
            yield running
        finally:
            future.cancel()


def fitted(vectors: NDArray[np.float32], dim: int) -> NDArray[np.float32]:
    cut = vectors[:, :dim]
    out: NDArray[np.float32] = (cut / np.linalg.norm(cut, axis=1, keepdims=True)).astype(np.float32)
    return out


async def load(
    database_url: str, name: str, dim: int, texts: list[str], vectors: NDArray[np.float32]
) -> dict[str, Any]:
    """Collection `name` filled with `vectors` (cut to `dim`), analyzed; its sizes."""
    store = await Store.open(database_url, max_size=2)
    try:
        rows = [
            DocumentRow(id=f"d{i}", text=text, metadata={}, content_hash=f"{i}".encode(), embedding=vector)
            for i, (text, vector) in enumerate(zip(texts, fitted(vectors, dim), strict=True))
        ]
        started = time.perf_counter()
        async with store.bulk_load(name):
            for start in range(0, len(rows), 1000):
                await store.upsert(name, rows[start : start + 1000])
        load_s = time.perf_counter() - started
        info = await store.collection(name)
        stats = await store.stats(name)
    finally:
        await store.close()
    part = sql.Identifier(f"documents_c{info.id}")
    async with await AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(sql.SQL("VACUUM ANALYZE {}").format(part))
        cur = await conn.execute(
            sql.SQL(
                "SELECT avg(coalesce(pg_column_size(embedding), 0) + coalesce(pg_column_size(embedding_half), 0)"
                " + coalesce(pg_column_size(embedding_bits), 0)), avg(pg_column_size(embedding)),"
                " avg(pg_column_size(embedding_half)), avg(pg_column_size(embedding_bits)) FROM {}"
            ).format(part)
        )
        row = await cur.fetchone()
    assert row is not None
    n = len(rows)
    return {
        "count": stats.count,
        "load_s": round(load_s, 2),
        "vector_bytes": round(float(row[0]), 1),
        "columns": {
            name: round(float(value), 1) if value is not None else None
            for name, value in zip(("embedding", "embedding_half", "embedding_bits"), row[1:], strict=True)
        },
        "index_bytes_per_vector": round(stats.index_bytes / n, 1),
        "partition_bytes_per_row": round(stats.table_bytes / n, 1),
    }


def default_candidates(storage: str) -> int:
    """What the server takes for k=10 when a search does not say (store.search)."""
    return search.default_candidates(K) * (search.BINARY_OVERSAMPLE if storage == "binary" else 1)


def exact_top(documents: NDArray[np.float32], queries: NDArray[np.float32]) -> list[set[str]]:
    scores = queries.astype(np.float64) @ documents.astype(np.float64).T
    return [{f"d{i}" for i in np.argsort(-row, kind="stable")[:K]} for row in scores]


def wire_table(vectors: NDArray[np.float32]) -> dict[str, Any]:
    """Bytes per vector of each wire encoding, and how far the decoded values are from float32."""
    out: dict[str, Any] = {}
    for name in encodings.ENCODINGS:
        rows = encodings.packed_rows(vectors, name)
        entry: dict[str, Any] = {"bytes_per_vector": int(rows.shape[1])}
        if name == "float16":
            decoded = rows.view("<f2").astype(np.float32)
        elif name == "int8":
            decoded = rows[:, 4:].view(np.int8).astype(np.float32) * rows[:, :4].copy().view("<f4")
        else:
            decoded = None
        if decoded is not None:
            entry["max_abs_error"] = float(np.abs(decoded - vectors).max())
            entry["min_cosine_to_float32"] = float(
                ((decoded * vectors).sum(axis=1) / np.linalg.norm(decoded, axis=1)).min()
            )
        out[name] = entry
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1500 documents, 40 queries")
    parser.add_argument("--docs", type=int)
    parser.add_argument("--queries", type=int)
    parser.add_argument("--binary-candidates", type=int, default=100, help="the second binary arm's candidates")
    parser.add_argument("--matryoshka-dims", type=int, help="add a float32 arm cut to D (MiniLM: not trained)")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--server", help="HOST:PORT of a running server to use instead of starting one")
    parser.add_argument("--database-url", help="with --server: its database (the collections are loaded there)")
    parser.add_argument("--prefix", default="", help="prefix of the collections' names (with --server)")
    args = parser.parse_args()
    n_docs = args.docs or (1500 if args.quick else 4000)
    n_queries = args.queries or (40 if args.quick else 200)

    # Passages of up to 80 words: the standard library has about 4200 of them, enough for the default run.
    texts = corpus.passages(n=n_docs + n_queries, max_words=80)
    if len(texts) < n_docs + n_queries:
        raise SystemExit(f"the corpus has {len(texts)} passages: ask for fewer than {n_docs} + {n_queries}")
    documents, held_out = texts[:n_docs], texts[n_docs : n_docs + n_queries]
    with server(args) as target, Client(target.address) as client:
        started = time.perf_counter()
        vectors = client.embed(documents, timeout=3600)
        queries = client.embed(held_out, timeout=600)
        embed_s = time.perf_counter() - started
        dim = vectors.shape[1]
        arms = [
            Arm("float32", "float32", dim),
            Arm("float16", "float16", dim),
            Arm("binary", "binary", dim),
            Arm(f"binary_c{args.binary_candidates}", "binary", dim, args.binary_candidates),
        ]
        if args.matryoshka_dims:
            arms.append(Arm(f"matryoshka{args.matryoshka_dims}", "float32", args.matryoshka_dims))
        sizes: dict[str, Any] = {}
        for arm in arms:
            if arm.name == arm.storage or arm.name.startswith("matryoshka"):
                name = args.prefix + arm.name
                client.create_collection(name, storage=arm.storage, dimensions=arm.dim if arm.dim != dim else None)
                sizes[arm.name] = anyio.run(load, target.database_url, name, arm.dim, documents, vectors)
        for arm in arms:
            sizes.setdefault(arm.name, sizes[arm.storage])
        collection = {arm.name: args.prefix + (arm.storage if arm.candidates else arm.name) for arm in arms}

        reference = exact_top(vectors, queries)
        latencies: dict[str, list[float]] = {arm.name: [] for arm in arms}
        found: dict[str, list[set[str]]] = {arm.name: [] for arm in arms}
        for arm in arms:  # warm-up: plans prepared, pages cached
            client.search(collection[arm.name], fitted(queries[:1], arm.dim)[0], k=K, candidates=arm.candidates)
        for q, query in enumerate(queries):
            order = arms if q % 2 == 0 else arms[::-1]
            for arm in order:
                vector = fitted(query[None, :], arm.dim)[0]
                t0 = time.perf_counter()
                hits = client.search(collection[arm.name], vector, k=K, candidates=arm.candidates)
                latencies[arm.name].append(time.perf_counter() - t0)
                found[arm.name].append({hit.id for hit in hits})

    results: dict[str, Any] = {}
    for arm in arms:
        recall = np.mean([len(a & b) / K for a, b in zip(found[arm.name], reference, strict=True)])
        ms = np.array(latencies[arm.name]) * 1000
        results[arm.name] = {
            "storage": arm.storage,
            "dim": arm.dim,
            "candidates": arm.candidates or default_candidates(arm.storage),
            "recall_at_10": round(float(recall), 4),
            "search_ms_p50": round(float(np.percentile(ms, 50)), 2),
            "search_ms_p90": round(float(np.percentile(ms, 90)), 2),
            **sizes[arm.name],
        }
    base = results["float32"]
    for entry in results.values():
        entry["vector_bytes_vs_float32"] = round(entry["vector_bytes"] / base["vector_bytes"], 3)
        entry["index_bytes_vs_float32"] = round(entry["index_bytes_per_vector"] / base["index_bytes_per_vector"], 3)
        entry["p50_vs_float32"] = round(entry["search_ms_p50"] / base["search_ms_p50"], 2)
    if args.matryoshka_dims:
        results[f"matryoshka{args.matryoshka_dims}"]["caveat"] = (
            "the served model is not trained for truncation (it declares no sizes; --matryoshka-dims declared"
            " one): this is what cutting an untrained model costs, not what a Matryoshka model would get"
        )
    else:
        results["matryoshka"] = {
            "applicable": False,
            "why": "the served model declares no Matryoshka sizes (MiniLM is not trained for truncation);"
            " run with --matryoshka-dims D to measure the cost of cutting it anyway",
        }
    report = {
        "benchmark": "storage",
        "quick": args.quick,
        "documents": n_docs,
        "queries": n_queries,
        "k": K,
        "dim": dim,
        "embed_s": round(embed_s, 1),
        "reference": "numpy exact cosine top-10 over the float32 document vectors",
        "arms": results,
        "wire": wire_table(vectors),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
    }
    print(f"{n_docs} documents, {n_queries} held-out queries, dim {dim}, recall@{K} vs numpy exact float32\n")
    print(
        f"{'arm':<16}{'recall@10':>10}{'vec B':>9}{'x f32':>7}{'index B/vec':>13}{'x f32':>7}{'p50 ms':>9}{'x f32':>7}"
    )
    for name, entry in results.items():
        if "recall_at_10" not in entry:
            print(f"{name:<16}  not applicable: {entry['why']}")
            continue
        print(
            f"{name:<16}{entry['recall_at_10']:>10.3f}{entry['vector_bytes']:>9.0f}{entry['vector_bytes_vs_float32']:>7.2f}"
            f"{entry['index_bytes_per_vector']:>13.0f}{entry['index_bytes_vs_float32']:>7.2f}"
            f"{entry['search_ms_p50']:>9.2f}{entry['p50_vs_float32']:>7.2f}"
        )
    print("\nwire encoding   bytes/vector  max |error|  min cosine to float32")
    for name, entry in report["wire"].items():
        error = f"{entry['max_abs_error']:.2e}" if "max_abs_error" in entry else "-"
        cosine = f"{entry['min_cosine_to_float32']:.5f}" if "min_cosine_to_float32" in entry else "-"
        print(f"{name:<16}{entry['bytes_per_vector']:>12}{error:>13}{cosine:>23}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "storage.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out / 'storage.json'}")


if __name__ == "__main__":
    main()
