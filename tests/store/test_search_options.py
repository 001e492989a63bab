"""Per-collection HNSW build options, and filtered searches that must still fill k."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from psycopg import AsyncConnection

from embedpool.errors import AlreadyExists, InvalidArgument
from embedpool.store import EmbeddedPostgres, Store, search
from embedpool.store.collections import HnswOptions, index_name

from .conftest import bucketed_collection, rows, unique_name, unit_vectors

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
def test_bad_options_are_invalid(kwargs: dict[str, Any]) -> None:
    with pytest.raises(InvalidArgument):
        HnswOptions(**kwargs)


async def test_selective_filter_returns_k_exact_hits(postgres: EmbeddedPostgres, store: Store) -> None:
    """1% of 3000 rows match: the search returns every one of the k nearest matching rows."""
    name, vectors = await bucketed_collection(postgres, store, n=3000, dim=DIM, buckets=100, seed=5)
    query = unit_vectors(1, DIM, seed=6)[0]
    for bucket in (3, 77):
        found = await store.search(name, query, k=10, filter={"bucket": bucket})
        matching = np.arange(bucket, 3000, 100)
        exact = {f"d{i}" for i in matching[np.argsort(-(vectors[matching] @ query))[:10]]}
        assert {c.id for c in found} == exact


def _exact_top(vectors: np.ndarray, query: np.ndarray, bucket: int, k: int) -> set[str]:
    matching = np.arange(bucket, len(vectors), 10)
    return {f"d{i}" for i in matching[np.argsort(-(vectors[matching] @ query))[:k]]}


@pytest.mark.parametrize("path", ["exact", "graph"])
async def test_ten_percent_filter_returns_the_exact_top_k(
    postgres: EmbeddedPostgres, store: Store, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """10% of 3000 rows match. The planner's estimate (300 rows) is under EXACT_MAX_ROWS, so the matches are
    sorted exactly; with the threshold at 0 the same search walks the graph at ef_search 40 / 10% = 400."""
    if path == "graph":
        monkeypatch.setattr(search, "EXACT_MAX_ROWS", 0)
    name, vectors = await bucketed_collection(postgres, store, n=3000, dim=DIM, buckets=10, seed=7)
    queries = unit_vectors(20, DIM, seed=8)
    hits = 0
    for n, query in enumerate(queries):
        found = await store.search(name, query, k=10, candidates=40, filter={"bucket": n % 10})
        assert len(found) == 10 and all(c.metadata["bucket"] == n % 10 for c in found)
        assert [c.distance for c in found] == sorted(c.distance for c in found)
        top = {c.id for c in found}
        if path == "exact":
            assert top == _exact_top(vectors, query, n % 10, 10)
        hits += len(top & _exact_top(vectors, query, n % 10, 10))
    assert hits / (10 * len(queries)) >= 0.95


def test_filtered_ef_search_scales_with_selectivity() -> None:
    assert search.filtered_ef_search(40, 10_000, 100_000) == 400
    assert search.filtered_ef_search(100, 10_000, 100_000) == 1000
    assert search.filtered_ef_search(10, 10_000, 100_000) == 400  # 40 at least, as unfiltered
    assert search.filtered_ef_search(600, 95_000, 100_000) == 632  # never below the candidates
    assert search.filtered_ef_search(40, 500, 100_000) == 1000  # pgvector's ceiling
    assert search.filtered_ef_search(40, 90_000, 100_000) == 45
    assert search.filtered_ef_search(40, 0, 0) == 40  # no statistics: as unfiltered
