"""Per-collection HNSW build options, and filtered searches that must still fill k."""

from __future__ import annotations

import numpy as np
import pytest
from psycopg import AsyncConnection, sql

from embedpool.errors import AlreadyExists, InvalidArgument
from embedpool.store import EmbeddedPostgres, Store
from embedpool.store.collections import HnswOptions, index_name

from .conftest import rows, unique_name, unit_vectors

pytestmark = pytest.mark.anyio
DIM = 16


async def _reloptions(uri: str, index: str) -> list[str]:
    async with await AsyncConnection.connect(uri, autocommit=True) as conn:
        cur = await conn.execute("SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (index,))
        row = await cur.fetchone()
        assert row is not None
        return list(row[0])


async def test_options_round_trip_into_the_index(postgres: EmbeddedPostgres, store: Store) -> None:
    name = unique_name("hnsw")
    info = await store.create_collection(name, model="m", dim=DIM, hnsw=HnswOptions(m=8, ef_construction=40))
    assert await store.hnsw_options(name) == HnswOptions(m=8, ef_construction=40)
    assert await _reloptions(postgres.uri, index_name(info)) == ["m=8", "ef_construction=40"]
    # A bulk load drops the index of the empty collection and builds it again: with the same options.
    async with store.bulk_load(name) as bulk:
        assert bulk
        await store.upsert(name, rows(unit_vectors(50, DIM)))
    assert await _reloptions(postgres.uri, index_name(info)) == ["m=8", "ef_construction=40"]


async def test_defaults_and_idempotent_create(store: Store) -> None:
    name = unique_name("hnsw")
    await store.create_collection(name, model="m", dim=DIM)
    assert await store.hnsw_options(name) == HnswOptions()
    await store.create_collection(name, model="m", dim=DIM, hnsw=HnswOptions())
    with pytest.raises(AlreadyExists, match="ef_construction=64"):
        await store.create_collection(name, model="m", dim=DIM, hnsw=HnswOptions(m=24))


@pytest.mark.parametrize(
    "kwargs", [{"m": 1}, {"m": 101}, {"m": True}, {"ef_construction": 2000}, {"m": 32, "ef_construction": 40}]
)
def test_bad_options_are_invalid(kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidArgument):
        HnswOptions(**kwargs)


async def test_selective_filter_returns_k_exact_hits(postgres: EmbeddedPostgres, store: Store) -> None:
    """1% of 3000 rows match: the search returns every one of the k nearest matching rows."""
    name = unique_name("filtered")
    info = await store.create_collection(name, model="m", dim=DIM)
    vectors = unit_vectors(3000, DIM, seed=5)
    batch = rows(vectors)
    for i, row in enumerate(batch):
        row.metadata["bucket"] = i % 100
    async with store.bulk_load(name):
        for start in range(0, len(batch), 1000):
            await store.upsert(name, batch[start : start + 1000])
    async with await AsyncConnection.connect(postgres.uri, autocommit=True) as conn:
        await conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(f"documents_c{info.id}")))
    query = unit_vectors(1, DIM, seed=6)[0]
    for bucket in (3, 77):
        found = await store.search_candidates(name, query, candidates=10, filter={"bucket": bucket})
        matching = np.arange(bucket, 3000, 100)
        exact = {f"d{i}" for i in matching[np.argsort(-(vectors[matching] @ query))[:10]]}
        assert {c.id for c in found} == exact
