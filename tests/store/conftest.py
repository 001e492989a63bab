"""Store fixtures: one embedded Postgres for the session (real server, no mocks) and a Store per test."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator

import numpy as np
import pytest
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql

from embedpool.store import DocumentRow, EmbeddedPostgres, HnswOptions, Store, running_postgres

_names = itertools.count()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    with running_postgres(tmp_path_factory.mktemp("store") / "pg") as pg:
        yield pg


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # grpc.aio, which shares this store, runs on asyncio only


@pytest.fixture
async def store(postgres: EmbeddedPostgres) -> AsyncIterator[Store]:
    if not postgres.running:  # a fault test that failed half-way must not take the rest down with it
        postgres.start()
    s = await Store.open(postgres.uri, max_size=4, timeout=3.0)
    try:
        yield s
    finally:
        await s.close()


def unique_name(prefix: str = "c") -> str:
    return f"{prefix}-{next(_names)}"


def unit_vectors(n: int, dim: int, seed: int = 0) -> NDArray[np.float32]:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def rows(vectors: NDArray[np.float32], *, prefix: str = "d", start: int = 0, tag: str = "v1") -> list[DocumentRow]:
    """One row per vector, ids prefix0.., content hash derived from `tag` so a new tag means changed content."""
    return [
        DocumentRow(
            id=f"{prefix}{start + i}",
            text=f"text {start + i} {tag}",
            metadata={"n": start + i, "tag": tag},
            content_hash=f"{start + i}:{tag}".encode(),
            embedding=v,
        )
        for i, v in enumerate(vectors)
    ]


async def bucketed_collection(
    postgres: EmbeddedPostgres,
    store: Store,
    *,
    n: int,
    dim: int,
    buckets: int,
    seed: int,
    hnsw: HnswOptions | None = None,
    bulk: bool = True,
) -> tuple[str, NDArray[np.float32]]:
    """n unit vectors, row i tagged metadata["bucket"] = i % buckets, loaded (in bulk mode, or row by row into
    the graph) and analyzed, so the planner knows each bucket's share as autovacuum soon would."""
    name = unique_name("bucketed")
    info = await store.create_collection(name, model="m", dim=dim, hnsw=hnsw)
    vectors = unit_vectors(n, dim, seed=seed)
    batch = rows(vectors)
    for i, row in enumerate(batch):
        row.metadata["bucket"] = i % buckets
    async with store.bulk_load(name) if bulk else contextlib.nullcontext():
        await store.upsert(name, batch)
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(f"documents_c{info.id}")))
    return name, vectors
