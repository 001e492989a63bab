"""Collections by storage type: float32 (`vector`), float16 (`halfvec` column) and binary (`bit` for a Hamming
index plus the float32 vectors for the exact rerank), against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray
from psycopg import AsyncConnection, sql

from embedpool.errors import AlreadyExists, InvalidArgument
from embedpool.store import EmbeddedPostgres, HnswOptions, Store
from embedpool.store.collections import index_name, partition_name
from embedpool.store.migrations import discover, migrate_down, migrate_up

from .conftest import rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio
DIM, N = 64, 600
STORAGES = ("float32", "float16", "binary")


def _clustered(n: int, dim: int, seed: int) -> NDArray[np.float32]:
    """Unit vectors around a few centres: neighbours that sign bits can find, as real embeddings have."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((8, dim))
    v = centres[rng.integers(0, 8, n)] + 0.6 * rng.standard_normal((n, dim))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v.astype(np.float32)


def _top(vectors: NDArray[np.float32], query: NDArray[np.float32], k: int) -> list[str]:
    cosine = vectors.astype(np.float64) @ query / np.linalg.norm(vectors, axis=1)
    return [f"d{i}" for i in np.argsort(-cosine, kind="stable")[:k]]


async def _collection(store: Store, storage: str, vectors: NDArray[np.float32]) -> str:
    name = unique_name(storage)
    info = await store.create_collection(name, model="m", dim=DIM, storage=storage)
    assert info.storage == storage
    await store.upsert(name, rows(vectors))
    return name


@pytest.mark.parametrize("storage", STORAGES)
async def test_search_finds_the_numpy_nearest_neighbours(store: Store, storage: str) -> None:
    vectors = _clustered(N, DIM, seed=1)
    name = await _collection(store, storage, vectors)
    stored = vectors.astype(np.float16).astype(np.float32) if storage == "float16" else vectors
    queries = _clustered(20, DIM, seed=2)
    agree = 0
    for query in queries:
        found = await store.search(name, query, k=10, candidates=200)
        assert len(found) == 10
        ids = [int(hit.id[1:]) for hit in found]
        # Exact distances on what is stored, best first.
        unit = stored[ids] / np.linalg.norm(stored[ids], axis=1, keepdims=True)  # float16 values: not unit length
        np.testing.assert_allclose([h.distance for h in found], 1.0 - unit @ query, atol=1e-5)
        assert [h.distance for h in found] == sorted(h.distance for h in found)
        np.testing.assert_array_equal(found[0].embedding, stored[ids[0]])
        agree += len(set(_top(stored, query, 10)) & {h.id for h in found})
    # Sign bits of 64 components rank coarsely: the rerank can only restore what the Hamming walk found.
    assert agree / (10 * len(queries)) >= (0.8 if storage == "binary" else 0.95)
    assert (await store.search(name, vectors[5], k=1))[0].id == "d5"


@pytest.mark.parametrize("storage", ["float16", "binary"])
async def test_updates_filters_and_the_index(postgres: EmbeddedPostgres, store: Store, storage: str) -> None:
    vectors = _clustered(200, DIM, seed=3)
    name = await _collection(store, storage, vectors)
    moved = unit_vectors(1, DIM, seed=4)
    result = await store.upsert(name, rows(moved, start=7, tag="v2"))
    assert (result.inserted, result.updated) == (0, 1)
    hit = (await store.search(name, moved[0], k=1))[0]
    assert hit.id == "d7" and hit.text == "text 7 v2"
    found = await store.search(name, vectors[9], k=3, filter={"n": 9})
    assert [h.id for h in found] == ["d9"]
    info = await store.get_collection(name)
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_get_indexdef(%s::regclass)", (index_name(info),))
        row = await cur.fetchone()
        assert row is not None
        assert ("halfvec_cosine_ops" if storage == "float16" else "bit_hamming_ops") in row[0]
        # Only what the storage keeps is filled.
        cur = await conn.execute(
            sql.SQL("SELECT count(embedding), count(embedding_half), count(embedding_bits) FROM {}").format(
                sql.Identifier(partition_name(info))
            )
        )
        assert await cur.fetchone() == ((0, 200, 0) if storage == "float16" else (200, 0, 200))


async def test_bulk_load_builds_the_storage_index(store: Store) -> None:
    vectors = _clustered(300, DIM, seed=5)
    name = unique_name("bulk")
    await store.create_collection(name, model="m", dim=DIM, storage="binary")
    async with store.bulk_load(name) as bulk:
        assert bulk
        await store.upsert(name, rows(vectors))
    assert (await store.stats(name)).indexed
    assert (await store.search(name, vectors[11], k=1))[0].id == "d11"


async def test_storage_is_checked_and_part_of_the_definition(store: Store) -> None:
    with pytest.raises(InvalidArgument, match="storage must be one of float32, float16, binary"):
        await store.create_collection(unique_name("bad"), model="m", dim=DIM, storage="int8")
    with pytest.raises(InvalidArgument, match=r"index\.halfvec"):
        await store.create_collection(
            unique_name("bad"), model="m", dim=DIM, storage="float16", hnsw=HnswOptions(halfvec=True)
        )
    name = unique_name("def")
    await store.create_collection(name, model="m", dim=DIM, storage="float16")
    with pytest.raises(AlreadyExists, match="storage=float16"):
        await store.create_collection(name, model="m", dim=DIM)
    assert {c.name: c.storage for c in await store.list_collections()}[name] == "float16"


async def test_a_float16_collection_refuses_values_beyond_half_range(store: Store) -> None:
    name = unique_name("f16")
    await store.create_collection(name, model="m", dim=DIM, storage="float16")
    big = np.zeros((1, DIM), np.float32)
    big[0, 0] = 1e6
    result = await store.upsert(name, rows(big))
    assert result.inserted == 0 and "float16" in result.rejected[0][1]


async def test_migrating_0007_down_and_up_keeps_the_vectors(postgres: EmbeddedPostgres) -> None:
    """Down: float16 collections get float32 `embedding` back (exact widening) and every index becomes the
    vector one the older code searches; up again, they are float32 collections."""
    uri = postgres.create_database("storage_migration")
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        await migrate_up(conn)
    store = await Store.open(uri, max_size=1)
    vectors = _clustered(50, DIM, seed=6)
    try:
        names = {s: await _collection(store, s, vectors) for s in STORAGES}
        infos = {s: await store.get_collection(names[s]) for s in STORAGES}
    finally:
        await store.close()
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        await migrate_down(conn, 6)
        for s, info in infos.items():
            cur = await conn.execute("SELECT pg_get_indexdef(%s::regclass)", (index_name(info),))
            row = await cur.fetchone()
            assert row is not None and "vector_cosine_ops" in row[0], s
            cur = await conn.execute(
                sql.SQL("SELECT embedding FROM {} WHERE id = 'd3'").format(sql.Identifier(partition_name(info)))
            )
            row = await cur.fetchone()
            assert row is not None
            expected = vectors[3].astype(np.float16) if s == "float16" else vectors[3]
            np.testing.assert_array_equal(np.array(row[0].strip("[]").split(","), np.float32), expected)
        await migrate_up(conn, target=discover()[-1].version)
    store = await Store.open(uri, max_size=1)
    try:
        for s in STORAGES:
            info = await store.get_collection(names[s])
            assert info.storage == "float32" and info.count == 50
            assert (await store.search(names[s], vectors[3], k=1))[0].id == "d3"
            await store.upsert(names[s], rows(vectors[:1], start=100))
    finally:
        await store.close()
