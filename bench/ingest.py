"""How fast does the store writer ingest 384-d vectors, against executemany INSERT and text-format COPY?

Every method runs the same upsert semantics (ON CONFLICT, skip rows whose content hash is unchanged) into a
fresh collection of an embedded Postgres in a temporary directory. The store writer is also timed on an
upsert of changed rows and a re-ingest of unchanged ones, each with and without the collection's HNSW index.
Counts are checked after every run, next to the timing.

    .venv/bin/python -P bench/ingest.py [--quick] [--out DIR]     # writes DIR/ingest.json (default bench/out)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import numpy as np
from psycopg import AsyncConnection, sql
from psycopg.types.json import Jsonb

from embedpool.store import DocumentRow, EmbeddedPostgres, Store
from embedpool.store.collections import index_name

DIM, BATCH = 384, 1000
_MERGE_SET = (
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


async def with_writer(store: Store, _: AsyncConnection[Any], name: str, rows: list[DocumentRow]) -> None:
    for batch in batches(rows):
        await store.upsert(name, batch)


async def with_executemany(store: Store, conn: AsyncConnection[Any], name: str, rows: list[DocumentRow]) -> None:
    cid = (await store.get_collection(name)).id
    query = (
        "INSERT INTO documents (collection_id, id, text, metadata, content_hash, embedding)"
        " VALUES (%s, %s, %s, %s, %s, %s)" + _MERGE_SET
    )
    for batch in batches(rows):
        async with conn.transaction(), conn.cursor() as cur:
            params = [(cid, r.id, r.text, Jsonb(r.metadata), r.content_hash, r.embedding) for r in batch]
            await cur.executemany(query, params)


async def with_text_copy(store: Store, conn: AsyncConnection[Any], name: str, rows: list[DocumentRow]) -> None:
    cid = (await store.get_collection(name)).id
    for batch in batches(rows):
        async with conn.transaction(), conn.cursor() as cur:
            await cur.execute(
                "CREATE TEMP TABLE staging (id text, text text, metadata jsonb, content_hash bytea, embedding vector)"
                " ON COMMIT DROP"
            )
            async with cur.copy("COPY staging FROM STDIN") as copy:
                for r in batch:
                    await copy.write_row((r.id, r.text, json.dumps(r.metadata), r.content_hash, r.embedding))
            await cur.execute(
                "INSERT INTO documents (collection_id, id, text, metadata, content_hash, embedding)"
                " SELECT DISTINCT ON (id) %s::int8, id, text, metadata, content_hash, embedding FROM staging"
                " ORDER BY id" + _MERGE_SET,
                (cid,),
            )


Method = Callable[[Store, AsyncConnection[Any], str, list[DocumentRow]], Awaitable[None]]


async def timed(method: Method, store: Store, conn: AsyncConnection[Any], name: str, rows: list[DocumentRow]) -> float:
    start = time.perf_counter()
    await method(store, conn, name, rows)
    rate = len(rows) / (time.perf_counter() - start)
    count = (await store.get_collection(name)).count
    assert count == len(rows), f"{name}: {count} rows stored, expected {len(rows)}"
    return rate


async def fresh_collection(store: Store, conn: AsyncConnection[Any], name: str, *, index: bool) -> str:
    info = await store.create_collection(name, model="bench", dim=DIM)
    if not index:
        await conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(info))))
    return name


async def run(uri: str, n_plain: int, n_indexed: int) -> dict[str, Any]:
    rates: dict[str, float] = {}
    store = await Store.open(uri)
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        from embedpool.store._codec import configure_connection

        await configure_connection(conn)
        for index, n in ((False, n_plain), (True, n_indexed)):
            suffix = "hnsw" if index else "noindex"
            fresh, changed = make_rows(n, "v1"), make_rows(n, "v2")
            for label, method in (("executemany", with_executemany), ("text_copy", with_text_copy)):
                name = await fresh_collection(store, conn, f"{label}-{suffix}", index=index)
                rates[f"{label}_fresh_{suffix}"] = await timed(method, store, conn, name, fresh)
            name = await fresh_collection(store, conn, f"writer-{suffix}", index=index)
            rates[f"writer_fresh_{suffix}"] = await timed(with_writer, store, conn, name, fresh)
            rates[f"writer_changed_{suffix}"] = await timed(with_writer, store, conn, name, changed)
            rates[f"writer_unchanged_{suffix}"] = await timed(with_writer, store, conn, name, changed)
    await store.close()
    return {
        "ratios": {
            "copy_vs_executemany": rates["writer_fresh_noindex"] / rates["executemany_fresh_noindex"],
            "copy_vs_text_copy": rates["writer_fresh_noindex"] / rates["text_copy_fresh_noindex"],
            "copy_vs_executemany_hnsw": rates["writer_fresh_hnsw"] / rates["executemany_fresh_hnsw"],
        },
        "rows_per_s": {k: round(v) for k, v in rates.items()},
        "params": {"dim": DIM, "batch": BATCH, "rows_noindex": n_plain, "rows_hnsw": n_indexed},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rows (under 2 minutes on 2 cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out")
    args = parser.parse_args()
    n_plain, n_indexed = (10_000, 2_000) if args.quick else (100_000, 20_000)
    with tempfile.TemporaryDirectory(prefix="embedpool-bench-") as tmp, EmbeddedPostgres(Path(tmp) / "pg") as pg:
        result = anyio.run(run, pg.uri, n_plain, n_indexed, backend="asyncio")
    print(f"{'method / scenario':<34}{'rows/s':>10}")
    for key, rate in result["rows_per_s"].items():
        print(f"{key:<34}{rate:>10}")
    for key, ratio in result["ratios"].items():
        print(f"{key:<34}{ratio:>9.2f}x")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
