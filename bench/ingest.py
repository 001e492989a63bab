"""How fast does the store writer ingest 384-d vectors, against executemany INSERT and text-format COPY?

Every upsert method runs the same semantics (ON CONFLICT on (collection, id), skip rows whose content hash is
unchanged, one transaction per batch of BATCH rows) into a fresh collection of an embedded Postgres in a
temporary directory; vectors are made beforehand, so only storage is measured.

- executemany: `cursor.executemany(INSERT .. ON CONFLICT ..)` as a user of psycopg + pgvector would write it:
  pgvector's own adapters (`register_vector_async`), Jsonb metadata, psycopg's automatic pipeline mode.
- text_copy: text-format COPY into a temp table, then INSERT .. SELECT .. ON CONFLICT.
- writer: `Store.upsert` (binary COPY stream built by rust/copy.rs; see python/embedpool/store/writer.py), on a
  fresh load, an upsert where every row changed, and a re-ingest of unchanged rows.
- writer_fresh_2_streams: two batches in flight at once, as the Ingest RPC runs them.
- copy_ceiling: the server's own limit, for reference: a pre-built binary COPY stream into a logged table
  with a primary key, no upsert semantics and no client work inside the timing.

With the HNSW index: rows entering the graph one by one (incremental), and `Store.bulk_load`, which drops
the index of the empty collection and builds it once at the end (its rate includes the build). Each
measurement runs --repeat times (median reported; the box may be shared); counts are checked after every run.

    .venv/bin/python -P bench/ingest.py [--quick] [--out DIR]   # writes DIR/ingest.json and DIR/ingest.png
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from pgvector.psycopg import register_vector_async
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from embedpool.store import DocumentRow, EmbeddedPostgres, Store
from embedpool.store.collections import index_name
from embedpool.store.records import CollectionInfo
from embedpool.store.writer import copy_chunks, validate

DIM, BATCH = 384, 1000
_UPSERT = (
    " ON CONFLICT (collection_id, id) DO UPDATE SET text = EXCLUDED.text, metadata = EXCLUDED.metadata,"
    " content_hash = EXCLUDED.content_hash, embedding = EXCLUDED.embedding, updated_at = now()"
    " WHERE documents.content_hash IS DISTINCT FROM EXCLUDED.content_hash"
)


def make_rows(n: int, tag: str) -> list[DocumentRow]:
    v = np.random.default_rng(0).standard_normal((n, DIM)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return [
        DocumentRow(f"doc-{i}", f"passage {i} {tag}", {"n": i, "tag": tag}, f"{i}:{tag}".encode(), v[i])
        for i in range(n)
    ]


def batches(rows: list[DocumentRow]) -> list[list[DocumentRow]]:
    return [rows[i : i + BATCH] for i in range(0, len(rows), BATCH)]


class Bench:
    def __init__(self, store: Store, plain: AsyncConnection[Any]) -> None:
        self.store, self.plain, self.names = store, plain, iter(range(1_000_000))

    async def collection(self, *, index: bool) -> CollectionInfo:
        info = await self.store.create_collection(f"c{next(self.names)}", model="bench", dim=DIM)
        if not index:
            await self.plain.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(info))))
        return info

    async def writer(self, info: CollectionInfo, rows: list[DocumentRow]) -> None:
        for batch in batches(rows):
            await self.store.upsert(info.name, batch)

    async def writer_2_streams(self, info: CollectionInfo, rows: list[DocumentRow]) -> None:
        """Two batches in flight, as the Ingest RPC has them: one is validated and encoded while Postgres
        stores the other."""
        todo = iter(batches(rows))

        async def stream() -> None:
            for batch in todo:
                await self.store.upsert(info.name, batch)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stream)
            tg.start_soon(stream)

    async def bulk_writer(self, info: CollectionInfo, rows: list[DocumentRow]) -> None:
        async with self.store.bulk_load(info.name) as bulk:
            assert bulk
            await self.writer(info, rows)

    async def executemany(self, info: CollectionInfo, rows: list[DocumentRow]) -> None:
        query = (
            "INSERT INTO documents (collection_id, id, text, metadata, content_hash, embedding)"
            " VALUES (%s, %s, %s, %s, %s, %s)" + _UPSERT
        )
        for batch in batches(rows):
            async with self.plain.transaction(), self.plain.cursor() as cur:
                params = [(info.id, r.id, r.text, Jsonb(r.metadata), r.content_hash, r.embedding) for r in batch]
                await cur.executemany(query, params)

    async def text_copy(self, info: CollectionInfo, rows: list[DocumentRow]) -> None:
        for batch in batches(rows):
            async with self.plain.transaction(), self.plain.cursor() as cur:
                await cur.execute(
                    "CREATE TEMP TABLE staging (id text, text text, metadata jsonb, content_hash bytea,"
                    " embedding vector) ON COMMIT DROP"
                )
                async with cur.copy("COPY staging FROM STDIN") as copy:
                    for r in batch:
                        await copy.write_row((r.id, r.text, json.dumps(r.metadata), r.content_hash, r.embedding))
                await cur.execute(
                    "INSERT INTO documents (collection_id, id, text, metadata, content_hash, embedding)"
                    " SELECT DISTINCT ON (id) %s::int8, id, text, metadata, content_hash, embedding FROM staging"
                    " ORDER BY id" + _UPSERT,
                    (info.id,),
                )

    async def copy_ceiling(self, info: CollectionInfo, rows: list[DocumentRow]) -> float:
        table = sql.Identifier(f"ceiling_{info.id}")
        await self.plain.execute(
            sql.SQL(
                "CREATE TABLE {} (collection_id int8, embedding vector, id text, text text, metadata jsonb,"
                " content_hash bytea, PRIMARY KEY (collection_id, id))"
            ).format(table)
        )
        streams = [list(copy_chunks(info.id, validate(b, info)[0])) for b in batches(rows)]
        query = sql.SQL(
            "COPY {} (collection_id, embedding, id, text, metadata, content_hash) FROM STDIN (FORMAT BINARY)"
        )
        started = time.perf_counter()
        for chunks in streams:
            async with self.plain.transaction(), self.plain.cursor() as cur, cur.copy(query.format(table)) as copy:
                for chunk in chunks:
                    await copy.write(chunk)
        elapsed = time.perf_counter() - started
        await self.plain.execute(sql.SQL("DROP TABLE {}").format(table))
        return len(rows) / elapsed

    async def count(self, info: CollectionInfo) -> int:
        return (await self.store.stats(info.name)).count


Method = Callable[[CollectionInfo, list[DocumentRow]], Awaitable[None]]


async def timed(bench: Bench, method: Method, info: CollectionInfo, rows: list[DocumentRow]) -> float:
    started = time.perf_counter()
    await method(info, rows)
    rate = len(rows) / (time.perf_counter() - started)
    count = await bench.count(info)
    assert count == len(rows), f"{info.name}: {count} rows stored, expected {len(rows)}"
    return rate


async def one_round(bench: Bench, n_plain: int, n_hnsw: int, n_bulk: int) -> dict[str, float]:
    rates: dict[str, float] = {}
    fresh, changed = make_rows(n_plain, "v1"), make_rows(n_plain, "v2")
    rates["copy_ceiling"] = await bench.copy_ceiling(await bench.collection(index=False), fresh)
    for label, method in (("executemany", bench.executemany), ("text_copy", bench.text_copy)):
        rates[f"{label}_fresh"] = await timed(bench, method, await bench.collection(index=False), fresh)
    info = await bench.collection(index=False)
    rates["writer_fresh"] = await timed(bench, bench.writer, info, fresh)
    rates["writer_fresh_2_streams"] = await timed(
        bench, bench.writer_2_streams, await bench.collection(index=False), fresh
    )
    rates["writer_changed"] = await timed(bench, bench.writer, info, changed)
    rates["writer_unchanged"] = await timed(bench, bench.writer, info, changed)

    fresh, changed = make_rows(n_hnsw, "v1"), make_rows(n_hnsw, "v2")
    rates["executemany_fresh_hnsw"] = await timed(bench, bench.executemany, await bench.collection(index=True), fresh)
    info = await bench.collection(index=True)
    rates["writer_fresh_hnsw"] = await timed(bench, bench.writer, info, fresh)
    rates["writer_changed_hnsw"] = await timed(bench, bench.writer, info, changed)
    rates["writer_unchanged_hnsw"] = await timed(bench, bench.writer, info, changed)
    bulk = make_rows(n_bulk, "v1")
    rates["writer_bulk_load_hnsw"] = await timed(bench, bench.bulk_writer, await bench.collection(index=True), bulk)
    return rates


async def run(uri: str, n_plain: int, n_hnsw: int, n_bulk: int, repeat: int) -> dict[str, Any]:
    store = await Store.open(uri)
    async with await AsyncConnection.connect(uri, autocommit=True) as plain:
        await register_vector_async(plain)
        bench = Bench(store, plain)
        rounds = [await one_round(bench, n_plain, n_hnsw, n_bulk) for _ in range(repeat)]
    await store.close()
    rates = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {
        "ratios": {
            "copy_vs_executemany": rates["writer_fresh"] / rates["executemany_fresh"],
            "copy_vs_text_copy": rates["writer_fresh"] / rates["text_copy_fresh"],
            "copy_vs_ceiling": rates["writer_fresh"] / rates["copy_ceiling"],
            "copy_2_streams_vs_executemany": rates["writer_fresh_2_streams"] / rates["executemany_fresh"],
            "copy_vs_executemany_hnsw": rates["writer_fresh_hnsw"] / rates["executemany_fresh_hnsw"],
            "bulk_load_vs_incremental_hnsw": rates["writer_bulk_load_hnsw"] / rates["writer_fresh_hnsw"],
        },
        "rows_per_s": {k: round(v) for k, v in rates.items()},
        "runs": [{k: round(v) for k, v in r.items()} for r in rounds],
        "params": {
            "dim": DIM,
            "batch": BATCH,
            "rows_noindex": n_plain,
            "rows_hnsw": n_hnsw,
            "rows_bulk_load": n_bulk,
            "repeat": repeat,
            "statistic": "median",
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = result["rows_per_s"]
    keys = list(rates)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(keys) + 1.2))
    colors = ["tab:blue" if k.startswith("writer") else "tab:gray" for k in keys]
    ax.barh(keys, [rates[k] for k in keys], color=colors)
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("rows/s (log scale; blue: Store.upsert, gray: baselines)")
    params = result["params"]
    ax.set_title(f"Ingest of {params['dim']}-d vectors, batches of {params['batch']}, median of {params['repeat']}")
    for y, k in enumerate(keys):
        ax.text(rates[k], y, f" {rates[k]:,}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rows (about 2 minutes on 2 cores)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    sizes = (20_000, 2_000, 20_000) if args.quick else (100_000, 10_000, 100_000)
    with tempfile.TemporaryDirectory(prefix="embedpool-bench-") as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        result = anyio.run(run, pg.uri, *sizes, args.repeat, backend="asyncio")
    print(f"{'method / scenario':<34}{'rows/s':>10}")
    for key, rate in result["rows_per_s"].items():
        print(f"{key:<34}{rate:>10}")
    for key, ratio in result["ratios"].items():
        print(f"{key:<34}{ratio:>9.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out / "ingest.png")


if __name__ == "__main__":
    main()
