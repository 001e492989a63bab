"""Recall@10 and queries/s of Store.search_candidates (HNSW, then the exact top 10 of the candidates).

Data (--data): `mixture` (default): many small Gaussian clusters (one per 50 rows on average) around random
unit centres, each point about cos 0.7 from its centre (so about 0.5 from its cluster mates), plus 10% of
the rows uniform on the sphere; queries come from the same distribution. A query's 10 nearest are then 10 of
~50 nearly equidistant cluster mates: much harder than a few big clusters, on which recall is trivially 1.
`random`: uniform unit vectors, the hardest case (all neighbours nearly equidistant). Real embeddings are
not available without the model. Ground truth: exact brute force in numpy.
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

from embedpool.store import DocumentRow, EmbeddedPostgres, Store

DIM, K, BUCKETS, NAME = 384, 10, 10, "bench"
CANDIDATES = (10, 20, 40, 100, 200)  # 40 = the server's default for k=10 (4 * k)
DEFAULT_CANDIDATES = 40


def unit(v: NDArray[np.float32]) -> NDArray[np.float32]:
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def mixture(n: int, rows: int, seed: int) -> NDArray[np.float32]:
    """`n` points of the distribution of a `rows`-row collection (the clusters depend on `rows` only)."""
    rng = np.random.default_rng(seed)
    centers = unit(np.random.default_rng(42).standard_normal((rows // 50, DIM)).astype(np.float32))
    v = centers[rng.integers(0, len(centers), n)] + rng.normal(0, 0.05, (n, DIM)).astype(np.float32)
    noise = rng.random(n) < 0.1
    v[noise] = rng.standard_normal((int(noise.sum()), DIM)).astype(np.float32)
    return unit(v)


def uniform(n: int, seed: int) -> NDArray[np.float32]:
    return unit(np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32))


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
                    DocumentRow(f"d{i}", f"passage {i}", {"bucket": i % BUCKETS}, str(i).encode(), vectors[i])
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


async def run(uri: str, n: int, n_queries: int, data: str) -> dict[str, Any]:
    if data == "mixture":
        vectors, queries = mixture(n, n, seed=0), mixture(n_queries, n, seed=1)
    else:
        vectors, queries = uniform(n, seed=0), uniform(n_queries, seed=1)
    write_s, build_s = await load(uri, vectors)
    buckets = [i % BUCKETS for i in range(n_queries)]
    truth = exact_top(vectors, queries, None)
    bucket_of = np.arange(n) % BUCKETS
    truth_filtered = [exact_top(vectors, q[None], bucket_of == b)[0] for q, b in zip(queries, buckets, strict=True)]
    store = await Store.open(uri)
    try:
        await measure(store, queries[:50], truth[:50], DEFAULT_CANDIDATES, None)  # warm the caches
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
            "data": DATA[data],
            "load_rows_per_s": n / write_s,
            "index_build_s": build_s,
            "client": "one client, queries back to back (Store.search_candidates + exact top 10 in numpy)",
        },
    }


DATA = {
    "mixture": "mixture: Gaussian clusters of ~50 rows (cos ~0.7 to their centre) + 10% uniform on the sphere",
    "random": "uniform random unit vectors",
}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, sweep in (("no filter", result["sweep"]), ("10% filter", result["sweep_filtered"])):
        ax.plot([r["recall_at_10"] for r in sweep], [r["qps"] for r in sweep], marker="o", label=label)
        for r in sweep:
            ax.annotate(
                f"ef {r['ef_search']}",
                (r["recall_at_10"], r["qps"]),
                fontsize=7,
                xytext=(3, 3),
                textcoords="offset points",
            )
    params = result["params"]
    ax.set_xlabel("recall@10 (vs exact brute force)")
    ax.set_ylabel("queries/s (one client)")
    ax.set_title(f"{params['rows']:,} x {params['dim']}, {params['data'].split(':')[0]}", fontsize=10)
    ax.axvline(0.99, color="gray", linestyle=":", linewidth=1)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20k rows instead of 100k")
    parser.add_argument("--data", choices=sorted(DATA), default="mixture")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    n, n_queries = (20_000, 200) if args.quick else (100_000, 500)
    with tempfile.TemporaryDirectory(prefix="embedpool-bench-") as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        result = anyio.run(run, pg.uri, n, n_queries, args.data, backend="asyncio")
    params = result["params"]
    print(f"{n} x {DIM}, {params['data']}, {n_queries} queries")
    print(f"load {params['load_rows_per_s']:.0f} rows/s without the index, index build {params['index_build_s']:.1f} s")
    print(f"{'filter':<8}{'candidates':>11}{'ef_search':>10}{'recall@10':>10}{'qps':>9}")
    for label, sweep in (("none", result["sweep"]), ("10%", result["sweep_filtered"])):
        for r in sweep:
            print(f"{label:<8}{r['candidates']:>11}{r['ef_search']:>10}{r['recall_at_10']:>10.3f}{r['qps']:>9.0f}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "search.png")


if __name__ == "__main__":
    main()
