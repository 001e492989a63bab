"""Recall@10 and queries/s of Store.search_candidates (HNSW, then the exact top 10 of the candidates).

Data: clustered synthetic 384-d unit vectors (256 Gaussian clusters), closer to real sentence embeddings than
uniform noise, on which every ANN index looks worse than in practice. Ground truth: exact brute force in numpy.
The candidate count sets ef_search (max(40, 2 * candidates)); sweeping it trades recall for speed. The
filtered runs restrict to one of 10 buckets (10% of the collection) with `metadata @> {"bucket": b}`.
QPS is one client issuing queries back to back over the unix socket.

    .venv/bin/python -P bench/search.py [--quick] [--out DIR]     # 100k rows; --quick: 20k. Writes DIR/search.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql

from embedpool.store import DocumentRow, EmbeddedPostgres, Store
from embedpool.store.collections import index_name

DIM, K, BUCKETS, NAME = 384, 10, 10, "bench"
CANDIDATES = (10, 20, 40, 100, 200)  # 40 = the server's default for k=10 (4 * k)
DEFAULT_CANDIDATES = 40


def clustered(n: int, seed: int) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    centers = np.random.default_rng(42).standard_normal((256, DIM)).astype(np.float32)
    v = centers[rng.integers(0, 256, n)] + rng.standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def load(uri: str, vectors: NDArray[np.float32]) -> float:
    """Bulk load without the index, then build it once (much faster than inserting into the graph)."""
    store = await Store.open(uri)
    info = await store.create_collection(NAME, model="bench", dim=DIM)
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(info))))
        for start in range(0, len(vectors), 2000):
            batch = [
                DocumentRow(f"d{i}", f"passage {i}", {"bucket": i % BUCKETS}, str(i).encode(), vectors[i])
                for i in range(start, min(start + 2000, len(vectors)))
            ]
            await store.upsert(NAME, batch)
        await conn.execute("SET maintenance_work_mem = '1GB'")
        started = time.perf_counter()
        await conn.execute(
            sql.SQL("CREATE INDEX {} ON {} USING hnsw ((embedding::vector({})) vector_cosine_ops)").format(
                sql.Identifier(index_name(info)), sql.Identifier(f"documents_c{info.id}"), sql.Literal(DIM)
            )
        )
        build_s = time.perf_counter() - started
        await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(f"documents_c{info.id}")))
    await store.close()
    return build_s


def exact_top(
    vectors: NDArray[np.float32], queries: NDArray[np.float32], mask: NDArray[np.bool_] | None
) -> list[set[int]]:
    scores = queries @ vectors.T
    if mask is not None:
        scores[:, ~mask] = -np.inf
    return [set(np.argsort(-row)[:K].tolist()) for row in scores]


async def measure(
    store: Store, queries: NDArray[np.float32], truth: list[set[int]], candidates: int, buckets: list[int] | None
) -> dict[str, float]:
    hits, started = 0, time.perf_counter()
    for n, q in enumerate(queries):
        found = await store.search_candidates(
            NAME, q, candidates=candidates, filter=None if buckets is None else {"bucket": buckets[n]}
        )
        hits += len({int(c.id[1:]) for c in found[:K]} & truth[n])
    elapsed = time.perf_counter() - started
    return {
        "candidates": candidates,
        "ef_search": max(40, 2 * candidates),
        "recall_at_10": hits / (K * len(queries)),
        "qps": len(queries) / elapsed,
    }


async def run(uri: str, n: int, n_queries: int) -> dict[str, Any]:
    vectors, queries = clustered(n, seed=0), clustered(n_queries, seed=1)
    build_s = await load(uri, vectors)
    buckets = [i % BUCKETS for i in range(n_queries)]
    truth = exact_top(vectors, queries, None)
    bucket_of = np.arange(n) % BUCKETS
    truth_filtered = [exact_top(vectors, q[None], bucket_of == b)[0] for q, b in zip(queries, buckets, strict=True)]
    store = await Store.open(uri)
    try:
        await measure(store, queries[:20], truth[:20], DEFAULT_CANDIDATES, None)  # warm the caches
        plain = [await measure(store, queries, truth, c, None) for c in CANDIDATES]
        filtered = [await measure(store, queries, truth_filtered, c, buckets) for c in CANDIDATES]
    finally:
        await store.close()
    default = next(r for r in plain if r["candidates"] == DEFAULT_CANDIDATES)
    default_f = next(r for r in filtered if r["candidates"] == DEFAULT_CANDIDATES)
    return {
        "recall_at_10": default["recall_at_10"],
        "qps": default["qps"],
        "filtered": {"recall_at_10": default_f["recall_at_10"], "qps": default_f["qps"], "selectivity": 1 / BUCKETS},
        "sweep": plain,
        "sweep_filtered": filtered,
        "params": {
            "rows": n,
            "dim": DIM,
            "queries": n_queries,
            "k": K,
            "hnsw": "m=16, ef_construction=64",
            "data": "clustered synthetic (256 clusters)",
            "index_build_s": build_s,
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k rows instead of 100k")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    n, n_queries = (20_000, 200) if args.quick else (100_000, 500)
    with tempfile.TemporaryDirectory(prefix="embedpool-bench-") as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        result = anyio.run(run, pg.uri, n, n_queries, backend="asyncio")
    print(f"{n} x {DIM}, {n_queries} queries, index build {result['params']['index_build_s']:.1f} s")
    print(f"{'filter':<8}{'candidates':>11}{'ef_search':>10}{'recall@10':>10}{'qps':>9}")
    for label, sweep in (("none", result["sweep"]), ("10%", result["sweep_filtered"])):
        for r in sweep:
            print(f"{label:<8}{r['candidates']:>11}{r['ef_search']:>10}{r['recall_at_10']:>10.3f}{r['qps']:>9.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
