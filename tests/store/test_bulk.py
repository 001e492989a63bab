"""Bulk mode: a first load runs without the HNSW index and builds it once at the end."""

from __future__ import annotations

import pytest
from psycopg import AsyncConnection, sql

from embedpool.store import EmbeddedPostgres, Store
from embedpool.store.collections import index_name

from .conftest import rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio
DIM = 16


async def test_first_load_drops_then_builds_the_index(store: Store) -> None:
    name = unique_name("bulk")
    await store.create_collection(name, model="m", dim=DIM)
    vectors = unit_vectors(500, DIM)
    async with store.bulk_load(name) as bulk:
        assert bulk
        stats = await store.stats(name)
        assert (stats.indexed, stats.index_bytes) == (False, 0)
        for start in range(0, 500, 100):
            await store.upsert(name, rows(vectors[start : start + 100], start=start))
        # Searches still work meanwhile (exactly).
        (first,) = await store.search(name, vectors[7], k=1)
        assert first.id == "d7"
    stats = await store.stats(name)
    assert (stats.count, stats.indexed) == (500, True)
    assert stats.index_bytes > 8192
    (first,) = await store.search(name, vectors[9], k=1)
    assert first.id == "d9"


async def test_a_collection_with_rows_loads_incrementally(store: Store) -> None:
    name = unique_name("bulk")
    await store.create_collection(name, model="m", dim=DIM)
    await store.upsert(name, rows(unit_vectors(10, DIM)))
    async with store.bulk_load(name) as bulk:
        assert not bulk
        assert (await store.stats(name)).indexed
        await store.upsert(name, rows(unit_vectors(10, DIM, seed=1), start=10))
    assert (await store.stats(name)).count == 20


async def test_an_interrupted_bulk_load_still_ends_with_an_index(store: Store) -> None:
    name = unique_name("bulk")
    await store.create_collection(name, model="m", dim=DIM)
    with pytest.raises(RuntimeError, match="client gave up"):
        async with store.bulk_load(name):
            await store.upsert(name, rows(unit_vectors(50, DIM)))
            raise RuntimeError("client gave up")
    assert (await store.stats(name)).indexed


async def test_a_load_that_died_before_the_build_resumes_in_bulk_mode(postgres: EmbeddedPostgres, store: Store) -> None:
    name = unique_name("bulk")
    info = await store.create_collection(name, model="m", dim=DIM)
    await store.upsert(name, rows(unit_vectors(50, DIM)))
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:  # as a dead bulk load left it
        await conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(info))))
    async with store.bulk_load(name) as bulk:
        assert bulk
        await store.upsert(name, rows(unit_vectors(50, DIM, seed=1), start=50))
    stats = await store.stats(name)
    assert (stats.count, stats.indexed) == (100, True)


async def _crashed_bulk_load(store: Store, postgres: EmbeddedPostgres) -> str:
    """A collection as a bulk load leaves it when its server dies mid-load: rows, no index."""
    name = unique_name("crashed")
    info = await store.create_collection(name, model="m", dim=DIM)
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        await conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index_name(info))))
    await store.upsert(name, rows(unit_vectors(50, DIM)))
    return name


async def test_an_interrupted_bulk_load_is_finished_at_start(store: Store, postgres: EmbeddedPostgres) -> None:
    name = await _crashed_bulk_load(store, postgres)
    assert not (await store.stats(name)).indexed
    assert name in await store.finish_interrupted_builds()
    assert (await store.stats(name)).indexed


async def test_a_load_in_progress_elsewhere_is_left_to_its_owner(store: Store, postgres: EmbeddedPostgres) -> None:
    name = await _crashed_bulk_load(store, postgres)
    other = await Store.open(postgres.uri, max_size=2)
    try:
        async with other.bulk_load(name) as bulk:  # "another server", loading in bulk right now
            assert bulk
            assert name not in await store.finish_interrupted_builds()
            async with store.bulk_load(name) as second:
                assert not second  # a second loader writes incrementally instead of racing the owner
            assert not (await store.stats(name)).indexed
        assert (await store.stats(name)).indexed  # the owner built it at the end
    finally:
        await other.close()
