"""Recall@10 and queries/s of Store.search (HNSW candidates, then their exact top 10), float32 and halfvec.

Data (--data):
- `lowrank` (default), closest to real sentence embeddings, whose intrinsic dimension is far below 384: a
  Gaussian mixture in R=64 latent dimensions (one cluster per 100 rows, spread as wide as the centres),
  mapped to 384-d by a fixed random 384 x R projection, plus isotropic noise (0.03 per coordinate, about
  half the norm of the signal), normalised. Queries are fresh draws from the same distribution.
- `mixture`: many small Gaussian clusters (one per 50 rows) around random unit centres in the full 384-d
  space, each point about cos 0.7 from its centre, plus 10% of the rows uniform on the sphere: full-rank
  and much harder for a graph index than real embeddings.
- `random`: uniform unit vectors, the hardest case (all neighbours nearly equidistant).
The reference measured on this machine with real embeddings (recall@10 0.951 at ef_search 40, 0.996 at
100, 200k rows, m=16, ef_construction=64) lies between `lowrank` and `mixture`.
Ground truth: exact brute force in numpy.

The candidate count sets ef_search (search.ef_search: max(40, candidates)); sweeping it trades recall for
speed; the `ef_search` column is that of an unfiltered search. A filtered search asks the planner how many
rows match: up to search.EXACT_MAX_ROWS it sorts them exactly, above it walks the graph at ef_search 40 /
selectivity (search.filtered_ef_search). Filters: `metadata @> {"b10": b}` (10% of the rows) and
`{"b100": b}` (1%). QPS: clients issuing queries back to back over the unix socket, one (serial) and 2 or 4
concurrent (as the server runs Search RPCs); each QPS is the median of --repeat runs (the 2 cores may be
shared). `server_ms`: the median EXPLAIN ANALYZE execution time of the default search, i.e. the part of a
call spent in the graph walk.
`rerank_all_candidates_qps`: the other design for a float32 index, every candidate shipped with its document and
vector and reranked in Rust (Store.search cuts to the top k inside Postgres instead; the distances are the same).
`halfvec`: the same searches after rebuilding the index on half-precision vectors (candidates reranked exactly
in Rust against the stored float32 vectors), with both index sizes. Exact baselines in the same run: brute
force by numpy (`q @ c.T` + argpartition) and by the Rust extension (`topk_cosine`), one query at a time.
`--builds`: also rebuild the index with other (m, ef_construction) and measure build time, recall and QPS.

    .venv/bin/python -P bench/search.py [--quick] [--data lowrank|mixture|random] [--builds] [--out DIR]
    # 100k rows (--quick: 20k); writes DIR/search.json and DIR/search.png
"""

from __future__ import annotations

import os
import sys

# Run as a script, this folder comes first on sys.path and bench/tokenize.py would shadow the stdlib
# `tokenize`; keep the folder, but last.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE] + [_HERE]

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql

from embedpool import _native
from embedpool.store import DocumentRow, EmbeddedPostgres, Store
from embedpool.store._codec import configure_connection
from embedpool.store.collections import HnswOptions, create_index_sql, index_name
from embedpool.store.search import default_candidates, ef_search, search_query

DIM, K, NAME = 384, 10, "bench"
CANDIDATES = (10, 40, 60, 100, 200)
DEFAULT_CANDIDATES = default_candidates(K)  # what a search for k=10 fetches unless told
FILTERS = {"10%": ("b10", 10), "1%": ("b100", 100)}
CLIENTS = (1, 2, 4)
BUILDS = ((16, 64), (16, 128), (24, 128), (16, 200))
LATENT, LATENT_NOISE = 64, 0.03


def unit(v: NDArray[np.float32]) -> NDArray[np.float32]:
    out: NDArray[np.float32] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def lowrank(n: int, rows: int, seed: int) -> NDArray[np.float32]:
    """`n` points of the distribution of a `rows`-row collection (projection and centres depend on `rows` only)."""
    fixed = np.random.default_rng(42)
    projection = fixed.standard_normal((LATENT, DIM)).astype(np.float32) / np.sqrt(LATENT)
    centers = fixed.standard_normal((max(1, rows // 100), LATENT)).astype(np.float32)
    rng = np.random.default_rng(seed)
    z = centers[rng.integers(0, len(centers), n)] + rng.standard_normal((n, LATENT)).astype(np.float32)
    return unit(unit(z @ projection) + LATENT_NOISE * rng.standard_normal((n, DIM)).astype(np.float32))


def mixture(n: int, rows: int, seed: int) -> NDArray[np.float32]:
    """`n` points of the distribution of a `rows`-row collection (the clusters depend on `rows` only)."""
    rng = np.random.default_rng(seed)
    centers = unit(np.random.default_rng(42).standard_normal((rows // 50, DIM)).astype(np.float32))
    v = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 0.05, (n, DIM)).astype(np.float32)
    noise = rng.random(n) < 0.1
    v[noise] = rng.standard_normal((int(noise.sum()), DIM)).astype(np.float32)
    return unit(v)


def uniform(n: int, rows: int, seed: int) -> NDArray[np.float32]:
    return unit(np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32))


DATA = {
    "lowrank": (lowrank, f"lowrank: Gaussian mixture in {LATENT} latent dims, random projection to {DIM}-d + noise"),
    "mixture": (mixture, "mixture: Gaussian clusters of ~50 rows (cos ~0.7 to their centre) + 10% uniform"),
    "random": (uniform, "uniform random unit vectors"),
}


def metadata(i: int) -> dict[str, int]:
    return {key: i % buckets for key, buckets in FILTERS.values()}


async def load(uri: str, vectors: NDArray[np.float32]) -> tuple[float, float]:
    """Store.bulk_load: the rows without the index, then one build. Seconds to write, seconds to build."""
    store = await Store.open(uri)
    try:
        await store.create_collection(NAME, model="bench", dim=DIM)
        started = time.perf_counter()
        async with store.bulk_load(NAME) as bulk:
            assert bulk
            for start in range(0, len(vectors), 2000):
                batch = [
                    DocumentRow(f"d{i}", f"passage {i}", metadata(i), str(i).encode(), vectors[i])
                    for i in range(start, min(start + 2000, len(vectors)))
                ]
                await store.upsert(NAME, batch)
            written = time.perf_counter()
        built = time.perf_counter()
        stats = await store.stats(NAME)
        assert (stats.count, stats.indexed) == (len(vectors), True)
    finally:
        await store.close()
    return written - started, built - written


async def rebuild(uri: str, hnsw: HnswOptions) -> float:
    """Seconds to build the collection's index again with `hnsw` (the bulk load's build settings)."""
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        await conn.execute(
            "UPDATE collections SET hnsw_m = %s, hnsw_ef_construction = %s, hnsw_halfvec = %s WHERE name = %s",
            (hnsw.m, hnsw.ef_construction, hnsw.halfvec, NAME),
        )
    store = await Store.open(uri)
    try:
        info = await store.get_collection(NAME)
        mem = f"{min(4096, max(64, int((info.count or 0) * (4 * DIM + 60 * hnsw.m) * 1.25 / 2**20)))}MB"
    finally:
        await store.close()
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(info))))
        await conn.execute("SELECT set_config('maintenance_work_mem', %s, false)", (mem,))
        started = time.perf_counter()
        await conn.execute(create_index_sql(info, hnsw))
        return time.perf_counter() - started


def exact_top(
    vectors: NDArray[np.float32], queries: NDArray[np.float32], mask: NDArray[np.bool_] | None
) -> list[set[int]]:
    scores = queries @ vectors.T
    if mask is not None:
        scores[:, ~mask] = -np.inf
    return [set(np.argsort(-row)[:K].tolist()) for row in scores]


class Bench:
    def __init__(self, store: Store, queries: NDArray[np.float32], repeat: int) -> None:
        self.store, self.queries, self.repeat = store, queries, repeat

    async def recall(
        self, truth: list[set[int]], candidates: int, filters: list[dict[str, int]] | None = None
    ) -> tuple[float, float]:
        """Recall@10 and the mean number of hits returned."""
        hits = returned = 0
        for n, q in enumerate(self.queries[: len(truth)]):
            found = await self.store.search(
                NAME, q, k=K, candidates=candidates, filter=None if filters is None else filters[n]
            )
            returned += len(found)
            hits += len({int(c.id[1:]) for c in found} & truth[n])
        return hits / (K * len(truth)), returned / len(truth)

    async def qps(self, candidates: int, clients: int = 1, filters: list[dict[str, int]] | None = None) -> float:
        """Median over `repeat` runs of queries/s with `clients` concurrent callers sharing the queries."""

        async def client(c: int) -> None:
            for n in range(c, len(self.queries), clients):
                await self.store.search(
                    NAME, self.queries[n], k=K, candidates=candidates, filter=None if filters is None else filters[n]
                )

        runs = []
        for _ in range(self.repeat):
            started = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for c in range(clients):
                    tg.start_soon(client, c)
            runs.append(len(self.queries) / (time.perf_counter() - started))
        return statistics.median(runs)

    async def point(
        self, truth: list[set[int]], candidates: int, filters: list[dict[str, int]] | None = None
    ) -> dict[str, float]:
        recall, returned = await self.recall(truth, candidates, filters)
        return {
            "candidates": candidates,
            "ef_search": ef_search(candidates),
            "recall_at_10": recall,
            "returned": returned,
            "qps": await self.qps(candidates, filters=filters),
        }


async def server_ms(uri: str, queries: NDArray[np.float32], candidates: int) -> float:
    """Median EXPLAIN ANALYZE execution time of the default search at its ef_search."""
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        await configure_connection(conn)
        store = await Store.open(uri, max_size=1)
        try:
            info = await store.get_collection(NAME)
        finally:
            await store.close()
        await conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef_search(candidates)),))
        query = b"EXPLAIN (ANALYZE, FORMAT JSON) " + search_query(info, filtered=False, max_distance=False).as_bytes(
            conn
        )
        times = []
        for q in queries:
            cur = await conn.execute(query, {"query": q, "fetch": K, "k": K})  # an unfiltered walk fetches k
            row = await cur.fetchone()
            assert row is not None
            times.append(float(row[0][0]["Execution Time"]))
        return statistics.median(times)


async def rerank_all_qps(uri: str, queries: NDArray[np.float32], candidates: int) -> float:
    """Queries/s of the other design for a float32 index: ship every candidate with its document and vector,
    rerank them in Rust, keep the top k (what Store.search does for halfvec indexes only). One client."""
    store = await Store.open(uri, max_size=1)
    try:
        info = await store.get_collection(NAME)
    finally:
        await store.close()
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        await configure_connection(conn)
        await conn.execute("SELECT set_config('hnsw.ef_search', %s, false)", (str(ef_search(candidates)),))
        query = search_query(info, filtered=False, max_distance=False).as_bytes(conn)
        params: dict[str, Any] = {"fetch": candidates, "k": candidates}

        async def one(q: NDArray[np.float32]) -> None:
            rows = await (await conn.cursor(binary=True).execute(query, params | {"query": q})).fetchall()
            _native.topk_cosine(q[None, :], np.stack([row[3] for row in rows]), K)

        for q in queries[:20]:
            await one(q)
        started = time.perf_counter()
        for q in queries:
            await one(q)
        return len(queries) / (time.perf_counter() - started)


def exact_qps(vectors: NDArray[np.float32], queries: NDArray[np.float32]) -> dict[str, float]:
    """Queries/s of exact brute force, one query at a time (the rows are unit vectors, so numpy needs no norms)."""

    def numpy_top(q: NDArray[np.float32]) -> NDArray[np.intp]:
        scores = vectors @ q
        top = np.argpartition(-scores, K)[:K]
        return top[np.argsort(-scores[top])]

    rates = {}
    for label, top in (("numpy", numpy_top), ("rust", lambda q: _native.topk_cosine(q[None, :], vectors, K)[0])):
        top(queries[0])
        started = time.perf_counter()
        for q in queries:
            top(q)
        rates[label] = len(queries) / (time.perf_counter() - started)
    return rates


async def measure(
    uri: str,
    vectors: NDArray[np.float32],
    queries: NDArray[np.float32],
    repeat: int,
    sweep: bool,
    *,
    filters: bool = True,
) -> dict[str, Any]:
    n = len(vectors)
    truth = exact_top(vectors, queries, None)
    store = await Store.open(uri, max_size=max(CLIENTS))
    try:
        bench = Bench(store, queries, repeat)
        await bench.recall(truth[:50], DEFAULT_CANDIDATES)  # warm the caches
        plain = [await bench.point(truth, c) for c in (CANDIDATES if sweep else (DEFAULT_CANDIDATES,))]
        default = next(r for r in plain if r["candidates"] == DEFAULT_CANDIDATES)
        filtered = {}
        for label, (key, buckets) in FILTERS.items() if filters else ():
            filters = [{key: i % buckets} for i in range(len(queries))]
            rows_bucket = np.arange(n) % buckets
            truth_f = [
                exact_top(vectors, q[None], rows_bucket == f[key])[0] for q, f in zip(queries, filters, strict=True)
            ]
            filtered[label] = [
                await bench.point(truth_f, c, filters) for c in (CANDIDATES if sweep else (DEFAULT_CANDIDATES,))
            ]
        concurrent = {str(c): await bench.qps(DEFAULT_CANDIDATES, c) for c in CLIENTS}
        index_bytes = (await store.stats(NAME)).index_bytes
    finally:
        await store.close()
    return {
        "index_bytes": index_bytes,
        "recall_at_10": default["recall_at_10"],
        "qps": default["qps"],
        "qps_by_clients": concurrent,
        "server_ms": await server_ms(uri, queries[:100], DEFAULT_CANDIDATES),
        "sweep": plain,
        "filtered": filtered,
    }


async def run(uri: str, n: int, n_queries: int, data: str, repeat: int, builds: bool) -> dict[str, Any]:
    make = DATA[data][0]
    vectors, queries = make(n, n, 0).astype(np.float32), make(n_queries, n, 1).astype(np.float32)
    write_s, build_s = await load(uri, vectors)
    result = await measure(uri, vectors, queries, repeat, sweep=True)
    exact = exact_qps(vectors, queries[:200])
    rerank_all = await rerank_all_qps(uri, queries, DEFAULT_CANDIDATES)
    half_build_s = await rebuild(uri, HnswOptions(halfvec=True))
    half = await measure(uri, vectors, queries, repeat, sweep=True, filters=False)
    defaults = HnswOptions()
    default_f = {
        label: next(r for r in rows if r["candidates"] == DEFAULT_CANDIDATES)
        for label, rows in result["filtered"].items()
    }
    result = {
        "recall_at_10": result["recall_at_10"],
        "qps": result["qps"],
        "qps_concurrent": result["qps_by_clients"],
        "filtered": {
            label: {"recall_at_10": r["recall_at_10"], "qps": r["qps"], "returned": r["returned"]}
            for label, r in default_f.items()
        },
        "server_ms": result["server_ms"],
        "index_bytes": result["index_bytes"],
        "exact_qps": exact,
        "rerank_all_candidates_qps": rerank_all,
        "ratios": {
            "top_k_in_postgres_vs_rerank_all_candidates_qps": result["qps"] / rerank_all,
            "hnsw_vs_exact_numpy_qps": result["qps"] / exact["numpy"],
            "hnsw_vs_exact_rust_qps": result["qps"] / exact["rust"],
            "halfvec_vs_vector_index_bytes": half["index_bytes"] / result["index_bytes"],
            "halfvec_vs_vector_qps": half["qps"] / result["qps"],
        },
        "halfvec": {
            "recall_at_10": half["recall_at_10"],
            "qps": half["qps"],
            "qps_concurrent": half["qps_by_clients"],
            "index_bytes": half["index_bytes"],
            "index_build_s": half_build_s,
            "sweep": half["sweep"],
        },
        "sweep": result["sweep"],
        "sweep_filtered": result["filtered"],
        "params": {
            "rows": n,
            "dim": DIM,
            "queries": n_queries,
            "k": K,
            "candidates": DEFAULT_CANDIDATES,
            "ef_search": ef_search(DEFAULT_CANDIDATES),
            "hnsw": {"m": defaults.m, "ef_construction": defaults.ef_construction},
            "data": DATA[data][1],
            "load_rows_per_s": n / write_s,
            "index_build_s": build_s,
            "repeat": repeat,
            "client": "Store.search back to back; qps_concurrent: that many clients on one Store",
        },
    }
    if builds:
        compared = []
        for m, ef_construction in BUILDS:
            hnsw = HnswOptions(m=m, ef_construction=ef_construction)
            seconds = await rebuild(uri, hnsw)
            point = await measure(uri, vectors, queries, repeat, sweep=False)
            compared.append(
                {"m": m, "ef_construction": ef_construction, "build_s": seconds}
                | {key: point[key] for key in ("recall_at_10", "qps", "server_ms")}
            )
        result["builds"] = compared
    return result


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    curves = [("no filter", result["sweep"]), ("halfvec index, no filter", result["halfvec"]["sweep"])] + [
        (f"{label} filter", rows) for label, rows in result["sweep_filtered"].items()
    ]
    for label, sweep in curves:
        ax.plot([r["recall_at_10"] for r in sweep], [r["qps"] for r in sweep], marker="o", label=label)
        for r in sweep:
            ax.annotate(
                f"{r['candidates']}/ef {r['ef_search']}",
                (r["recall_at_10"], r["qps"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    params = result["params"]
    ax.set_xlabel("recall@10 (vs exact brute force)")
    ax.set_ylabel("queries/s (one client)")
    hnsw = params["hnsw"]
    ax.set_title(
        f"{params['rows']:,} x {params['dim']}, {params['data'].split(':')[0]}, m={hnsw['m']},"
        f" ef_construction={hnsw['ef_construction']}; labels: candidates/ef_search",
        fontsize=9,
    )
    ax.axvline(0.99, color="gray", linestyle=":", linewidth=1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k rows and 200 queries instead of 100k and 500")
    parser.add_argument("--data", choices=sorted(DATA), default="lowrank")
    parser.add_argument(
        "--builds", action="store_true", help=f"also compare index builds (m, ef_construction) {BUILDS}"
    )
    parser.add_argument("--repeat", type=int, default=3, help="runs per QPS figure (median)")
    parser.add_argument("--rows", type=int, help="collection size (default 100k; --quick 20k)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    n, n_queries = (20_000, 200) if args.quick else (100_000, 500)
    n = args.rows or n
    with tempfile.TemporaryDirectory(prefix="embedpool-bench-") as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        result = anyio.run(run, pg.uri, n, n_queries, args.data, args.repeat, args.builds, backend="asyncio")
    params = result["params"]
    print(f"{n} x {DIM}, {params['data']}, {n_queries} queries, hnsw {params['hnsw']}")
    print(f"load {params['load_rows_per_s']:.0f} rows/s without the index, index build {params['index_build_s']:.1f} s")
    print(f"{'filter':<8}{'candidates':>11}{'ef_search':>10}{'recall@10':>10}{'returned':>9}{'qps':>9}")
    for label, sweep in [
        ("none", result["sweep"]),
        ("halfvec", result["halfvec"]["sweep"]),
        *result["sweep_filtered"].items(),
    ]:
        for r in sweep:
            print(
                f"{label:<8}{r['candidates']:>11}{r['ef_search']:>10}{r['recall_at_10']:>10.3f}{r['returned']:>9.1f}"
                f"{r['qps']:>9.0f}"
            )
    clients = ", ".join(f"{c} clients {q:.0f}" for c, q in result["qps_concurrent"].items())
    print(f"default search: qps {clients}; server execution {result['server_ms']:.2f} ms (median)")
    half = result["halfvec"]
    half_clients = ", ".join(f"{c} clients {q:.0f}" for c, q in half["qps_concurrent"].items())
    print(
        f"halfvec index: {half['index_bytes'] / 2**20:.0f} MiB vs {result['index_bytes'] / 2**20:.0f} MiB,"
        f" build {half['index_build_s']:.1f} s; qps {half_clients}"
    )
    exact = result["exact_qps"]
    rerank_all = result["rerank_all_candidates_qps"]
    print(f"float32 index, all {DEFAULT_CANDIDATES} candidates shipped and reranked in Rust: {rerank_all:.0f} qps")
    print(f"exact brute force, one query at a time: numpy {exact['numpy']:.0f} qps, rust {exact['rust']:.0f} qps")
    for key, ratio in result["ratios"].items():
        print(f"{key:<34}{ratio:>8.2f}x")
    for b in result.get("builds", []):
        print(
            f"m={b['m']} ef_construction={b['ef_construction']}: build {b['build_s']:.1f} s,"
            f" recall@10 {b['recall_at_10']:.3f}, {b['qps']:.0f} qps, server {b['server_ms']:.2f} ms"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "search.png")


if __name__ == "__main__":
    main()
